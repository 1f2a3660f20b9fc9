"""``slug compare``: SLUG and the baselines (FT, GA, GA+FT, SalUn, SSD) on the same data, with cost."""

from __future__ import annotations

import sys

from .args import (BATCH, COUNT, FRACTION, SEED, THREADS, _number, data_dir_conflict, float_at_least, float_in,
                   item_list, method_lr, name_list, nonempty, refuse, split_list, template, text_file,
                   validate_compare_data)


def lr_list(text: str) -> list[float]:
    """``--lr-sweep``: a comma list of distinct learning rates, each > 0 (``0,1`` ran, ``-1`` failed in torch after
    15 s of loading, naming no option; eleventh trial)."""
    import argparse

    values = [_number(float, x) for x in split_list(item_list(text))]
    bad = [v for v in values if not v > 0]
    if bad:
        raise argparse.ArgumentTypeError(f"each learning rate must be > 0, got {bad[0]:g} in {text!r}")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"a learning rate is given twice in {text!r}")
    return sorted(values)


def cmd_compare(a) -> int:
    """`slug compare`: SLUG and the baselines on the same data (the embedded world, or explicit data flags)."""
    from ..workflows.compare import CompareConfig, render_compare, run_compare
    from ..world import render as world
    from ..world.demo_data import default_concept

    from .audit import unread_audit_options

    from .outputs import out_inside_model

    msg = (data_dir_conflict(a) or unread_audit_options(a, "CLIP" if a.audit else None)
           or out_inside_model(a.out, {}))  # it named its hidden temporary folder there, as world_config's
    if msg:
        return refuse(msg)
    concepts = split_list(a.concepts) if a.concepts else []
    if a.pretrained and not (a.forget or a.model != "embedded"):  # it compared on the shipped model (13th trial)
        return refuse("--pretrained with the embedded world's data: slug compare runs every method on the shipped "
                      "model there; pass the data flags (--forget, --retain, --val-identities, …) to compare on a "
                      "checkpoint")
    if a.modes is not None and not concepts:  # it ran the single-concept comparison, silently (eleventh trial)
        return refuse("--modes applies to several concepts: add --concepts A,B (or leave --modes out)")
    try:
        if a.forget or a.model != "embedded":
            concept = a.concept if a.concept is not None else " + ".join(concepts)
        else:
            concepts = [world.identity_by_name(c).name for c in concepts]
            concept = " + ".join(concepts) if concepts else world.identity_by_name(
                default_concept() if a.concept is None else a.concept).name
    except KeyError as e:
        print(f"error: {'--concepts' if getattr(a, 'concepts', None) else '--concept'}: {e.args[0]}", file=sys.stderr)
        return 2
    methods = split_list(a.methods)
    msg = _unread_method_options(a, methods)
    if msg:
        return refuse(msg)
    lrs = {}
    for item in a.lr or []:
        k, _, v = item.partition("=")
        if k.strip() in lrs:
            return refuse(f"--lr {k.strip()} is given twice ({lrs[k.strip()]:g} and {float(v):g}); give it once")
        lrs[k.strip()] = float(v)
    default_out = f"runs/compare-{'+'.join(c.replace(' ', '_') for c in (concepts or [concept]))}"
    out = a.out if a.out is not None else default_out
    unlearn = None
    if a.forget or a.model != "embedded":
        from ..workflows.unlearn import UnlearnConfig

        msg = validate_compare_data(a, concepts)
        if msg:
            return refuse(msg)
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
                       modes=_modes(a.modes),
                       lr_sweep=a.lr_sweep,
                       audit=_audit_opts(a, concepts))
    report = run_compare(cc)
    print(render_compare(report))
    from ..report.compare import MIA_SKIPPED, mia_skipped

    if mia_skipped(report):
        print(f"note: {MIA_SKIPPED}", file=sys.stderr)
    from ..report.unlearn import outputs_line, verdict_lines

    print(outputs_line(out))
    from ..workflows.verdict import exit_status_of

    for line in verdict_lines(report.get("verdict")):
        print(line)
    return exit_status_of(report)


def _audit_opts(a, concepts: list[str]) -> dict | None:
    """``--audit``: the audit options (raises ``ValueError`` for several concepts: audit one at a time)."""
    if not a.audit:
        return None
    if len(concepts) > 1:
        raise ValueError("--audit audits one concept: compare with --concept NAME, or run `slug audit --patch "
                         "RUN/slug --concept NAME` per concept")
    from .audit import audit_options

    return {k: v for k, v in audit_options(a).items() if k != "progress"}


def add_parsers(sub) -> None:
    """Add the `compare` subcommand to ``sub``."""
    cp = sub.add_parser("compare", help="SLUG vs FT, GA, GA+FT, SalUn, SSD on the same data, with cost")
    cp.add_argument("--model", default="embedded", help="'embedded' (the world's data by default) or any id of "
                                                        "`slug unlearn` (then pass its data flags)")
    cp.add_argument("--concept", type=nonempty, default=None, help="identity name (default: the demo's)")
    cp.add_argument("--concepts", type=name_list, default=None,
                    help="A,B,...: several identities, unlearned jointly (one forget set) and sequentially (one step "
                         "per concept; SLUG chains patches)")
    cp.add_argument("--modes", type=item_list, default=None,
                    help="with --concepts: joint, sequential, or both (joint,sequential; the default)")
    cp.add_argument("--methods", type=item_list, default="slug,ft,ga,gaft,salun,ssd",
                    help="comma list of slug, ft, ga, gaft, salun, salun-rl, ssd, ssd-cumulative")
    cp.add_argument("--epochs", type=COUNT, default=None, help="epochs of the iterative baselines (default: each "
                                                             "method's, <= 10)")
    cp.add_argument("--lr", type=method_lr, action="append", default=None, metavar="METHOD=LR",
                    help="learning-rate override, e.g. --lr gaft=2e-4 (repeatable)")
    cp.add_argument("--select-metric", default="forget_top5", choices=["forget_top1", "forget_top5"],
                    help="epoch selection: first epoch with validation metric 0, else the minimum (default FA@5, "
                         "SLUG's own criterion; the paper's rule is forget_top1)")
    cp.add_argument("--lr-sweep", nargs="?", type=lr_list, const=[3e-5, 1e-4, 3e-4, 1e-3], default=None,
                    metavar="LR,LR,...",
                    help="GA/GA+FT/SalUn: try these learning rates in ascending order, keep the smallest that meets "
                         "the epoch rule; the whole sweep counts in the method's time (default grid "
                         "3e-5,1e-4,3e-4,1e-3)")
    cp.add_argument("--salun-threshold", type=float_in(0.0, 1.0), default=None,
                    help="SalUn mask fraction (default 0.5)")
    cp.add_argument("--ssd-alpha", type=float_at_least(0.0), default=None,
                    help="fix SSD's α (λ = 1, one application); default: sweep α 10,5,2,1 × λ 1,.5,.2,.1 by validation")
    cp.add_argument("--forget-loss", choices=["cos", "clip"], default=None,
                    help="GA, GA+FT, SalUn forget pass: ascent on 1 - cos (default, SLUG's) or on the CLIP loss "
                         "(the SLUG repo's _o variants)")
    cp.add_argument("--rl-forget-fraction", type=FRACTION, default=None, metavar="F",
                    help="salun-rl: share of relabelled forget pairs in each mixed batch (default: one shuffled "
                         "pass over relabelled forget + retain pairs)")
    cp.add_argument("--importance-batch-size", type=BATCH, default=None,
                    help="batch of SalUn's saliency gradient and SSD's importances (default 16, the SLUG repo's "
                         "calc_grad pass)")
    cp.add_argument("--ssd-importance-loss", choices=["split", "clip", "cos"], default=None,
                    help="SSD importances: split = mean cos on D_f, CLIP loss on D_r (default, the SLUG repo's); "
                         "clip / cos = that loss on both")
    cp.add_argument("--forget-samples", type=COUNT, default=None, help="use the first N forget pairs (default all)")
    cp.add_argument("--retain-samples", type=BATCH, default=None,
                    help="use the first N retain pairs, N >= 2 (default all)")
    cp.add_argument("--retain-identity-fraction", type=FRACTION, default=None, metavar="F",
                    help="embedded world: a retain set of 900 pool pairs, a share F of them other identities' and "
                         "the rest utility pairs (default: the curated retain set, ~91%% identities; the paper's "
                         "LAION retain shard has few of the related test identities)")
    cp.add_argument("--device", default="cpu", help="the model's device, e.g. cuda (data stays in CPU memory and "
                                                    "each batch is moved before its forward)")
    cp.add_argument("--data-dir", default=None, help="where the world's data is generated (default: cache dir)")
    g = cp.add_argument_group("explicit data (as `slug unlearn`; required for models other than 'embedded')")
    g.add_argument("--pretrained", default=None, help="see `slug unlearn --help`")
    g.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="see `slug unlearn --help`")
    for flag in ("--forget", "--retain", "--val-identities", "--test-identities", "--utility-val", "--utility-test"):
        g.add_argument(flag, default=None, help="see `slug unlearn --help`")
    for flag, keywords in (("--names", ()), ("--related-names", ()), ("--utility-classnames", ("imagenet",))):
        g.add_argument(flag, type=text_file(*keywords), default=None, help="see `slug unlearn --help`")
    g.add_argument("--identity-template", type=template, action="append", default=None,
                   help="see `slug unlearn --help` (default '{}.')")
    g.add_argument("--utility-templates", type=text_file("imagenet-simple", "imagenet"), default="imagenet-simple",
                   help="see `slug unlearn --help`")
    g.add_argument("--strict", action="store_true", help="fail on samples without caption / bad images")
    g.add_argument("--mia-heldout", default=None, help="captioned pairs of the concept never trained on (shards or "
                                                       "folder) for the MIA; without it the MIA is skipped")
    cp.add_argument("--out", default=None, help="output folder (default runs/compare-<Name>)")
    cp.add_argument("--overwrite", action="store_true", help="replace an existing comparison in --out")
    cp.add_argument("--batch-size", type=BATCH, default=32, help="baselines' batch size (official 32); SLUG keeps "
                                                               "`slug demo`'s settings")
    cp.add_argument("--seed", type=SEED, default=0, help="random seed (default 0)")
    cp.add_argument("--threads", type=THREADS, default=1, help="torch CPU threads (default 1)")
    cp.add_argument("--no-progress", action="store_true", help="no progress bars")
    cp.add_argument("--audit", action="store_true",
                    help="audit every method's result (slug audit's probes: prompt variants, adversarial prompts, "
                         "precision, relearning, linear probe); a table in compare.md, each method's full audit in "
                         "audit/<method>/")
    from .audit import add_audit_budget_args

    add_audit_budget_args(cp)
    cp.set_defaults(func=cmd_compare)


def _modes(given: str | None) -> list[str]:
    """``--modes``: a comma list of joint / sequential; ``both`` (what its help offered: it was refused, trial 39)
    stands for the two."""
    modes = split_list(given or "both")
    return list(dict.fromkeys(m for x in modes for m in (("joint", "sequential") if x == "both" else (x,))))


# the baselines that read each method option (``compare_support.make_baseline``)
_READ_BY = {"epochs": ("ft", "ga", "gaft", "salun", "salun-rl"), "salun_threshold": ("salun", "salun-rl"),
            "forget_loss": ("ga", "gaft", "salun", "salun-rl"), "rl_forget_fraction": ("salun-rl",),
            "importance_batch_size": ("salun", "salun-rl", "ssd", "ssd-cumulative"),
            "ssd_importance_loss": ("ssd", "ssd-cumulative"), "ssd_alpha": ("ssd", "ssd-cumulative")}


def _unread_method_options(a, methods: list[str]) -> str | None:
    """The refusal for a method option none of ``methods`` reads (``--methods slug --epochs 3`` ran, silently, as
    ``--lr gaft=…`` without gaft is refused; trial 39); those given none get :class:`CompareConfig`'s default."""
    import dataclasses

    from ..workflows.compare import CompareConfig

    defaults = {f.name: f.default for f in dataclasses.fields(CompareConfig)}
    for name, readers in _READ_BY.items():
        if getattr(a, name) is not None and not set(readers) & set(methods):
            return (f"--{name.replace('_', '-')} applies to {', '.join(readers)}, and --methods {','.join(methods)} "
                    "runs none of them; drop it, or add one of those methods")
        if getattr(a, name) is None:
            setattr(a, name, defaults[name])
    return None
