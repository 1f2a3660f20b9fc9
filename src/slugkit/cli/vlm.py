"""``slug demo --target vlm``: unlearn identities from the embedded VLM (:mod:`slugkit.workflows.vlm_demo`)."""

from __future__ import annotations

import sys
from pathlib import Path

from ..workflows.verdict import exit_status_of
from .args import FRACTION, _number, budgets_of, max_layers, refuse, search_config, split_list


def name_prob(text: str) -> float | None:
    """``--vlm-name-prob``: a probability in (0, 1], or ``off`` (None: the answers only)."""
    import argparse

    if text.strip().lower() in ("off", "none"):
        return None
    try:
        v = _number(float, text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e}; or 'off'") from None
    if not 0.0 < v <= 1.0:  # 0: every image would name the target, no step could be accepted
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (a probability above 0), got {text}; or 'off'")
    return v


name_prob.__name__ = "probability or off"


def cmd_demo_vlm(a) -> int:
    """`slug demo --target vlm`: unlearn one or more identities from the embedded VLM (LLaVA) by patching its CLIP
    vision tower."""
    from dataclasses import replace

    from ..report.vlm import print_vlm_summary
    from ..workflows.vlm_demo import DEFAULT_VAL_IMAGES, default_out, run_vlm_demo
    from ..world import render as world

    if a.sequential:
        return refuse("--target vlm unlearns --concepts jointly (one edit); --sequential is for the CLIP demo")
    msg = unused(a, a.sd_defaults, "--target sd", "--target vlm")
    if msg:
        return refuse(msg)
    wanted = split_list(a.concepts) if a.concepts else ([a.concept] if a.concept is not None else None)
    if a.audit and wanted and len(wanted) > 1:
        return refuse("--audit audits one concept: run `slug audit --patch RUN` for a single-identity run")
    try:
        targets = [world.identity_by_name(c).name for c in wanted] if wanted else None
    except KeyError as e:
        print(f"error: {'--concepts' if a.concepts else '--concept'}: {e.args[0]}", file=sys.stderr)
        return 2
    # the CLIP search options (--steps, --margin, --threshold, …) were read only beside --criterion (trial 40);
    # their defaults are SearchConfig's, so a run given none is the run it was
    search = replace(search_config(a), metric=a.criterion) if a.criterion else search_config(a)
    result = run_vlm_demo(targets, a.out, data_dir=a.data_dir, vlm_dir=a.vlm_model,
                          val_images=a.val_images or DEFAULT_VAL_IMAGES, threshold=a.gen_threshold,
                          other_budget=a.other_budget, neighbour_budget=a.neighbour_budget,
                          utility_budget=a.vlm_utility_budget, search=search, seed=a.seed, threads=a.threads,
                          progress=not a.no_progress, overwrite=a.overwrite, budgets=budgets_of(a),
                          max_searched=a.max_searched, gradient=a.vlm_gradient,
                          max_layers=max_layers(a), name_prob=a.vlm_name_prob,
                          fallback=a.vlm_fallback, protect_neighbours=a.protect_neighbours)
    done = result["concepts"] if result.get("concepts") else [result["concept"]]
    out = Path(a.out if a.out is not None else default_out(done))
    print_vlm_summary(result, str(out))
    rc = exit_status_of(result)
    if a.audit and (out / "patch" / "patch.json").is_file():
        from .audit import AUDIT_EXIT, audit_vlm, said_audit

        res = said_audit(out, audit_vlm(out / "patch", out, a))
        rc = max(rc, AUDIT_EXIT[res["status"]])
    return rc


# the --target sd group's options that --target vlm reads too (the others it refuses: cli.run sets sd_defaults)
VLM_READS = frozenset({"val_images", "other_budget", "neighbour_budget", "gen_threshold", "max_searched"})


def unused(a, defaults: dict, owner: str, target: str) -> str | None:
    """The refusal for options of ``owner`` (their dests and defaults, as the parser set them in ``a``) given to a
    ``slug demo --target`` that would silently ignore them; None when none was given."""
    given = [k for k, default in defaults.items() if getattr(a, k, default) != default]
    if not given:
        return None
    run = "--target vlm" if any(k.startswith("vlm") for k in given) else owner.replace(" / ", " or ")  # both (v42)
    return (f"{', '.join('--' + k.replace('_', '-') for k in given)}: option(s) of {owner}, which {target} does not "
            f"use; drop them or run {run}")


def unused_by_clip(a) -> str | None:
    """`slug demo` (--target clip): the --target sd / vlm options given, which it would silently ignore
    (``a.generator_defaults``: every option of those two argument groups with its default, set by the parser)."""
    given = {k for k, d in a.generator_defaults.items() if getattr(a, k, d) != d}
    owner = ("--target vlm" if given and given <= set(a.vlm_defaults) else  # it said "--target sd / --target vlm"
             "--target sd" if given and given <= set(a.sd_defaults) else  # of --sd-step (trial 40)
             "--target sd / --target vlm")
    return unused(a, a.generator_defaults, owner, "the CLIP demo (--target clip)")


def add_vlm_args(d):
    """The ``--target vlm`` options of ``slug demo``; returns their argument group. Their defaults are written here
    (the parser imports no torch); a test holds them to :mod:`slugkit.workflows.vlm_demo`'s."""
    vg = d.add_argument_group("--target vlm (also: --val-images, default 10; --other-budget, --neighbour-budget, "
                              "--gen-threshold on the VLM's answers; --max-searched; --max-layers)")
    vg.add_argument("--vlm-model", default=None, help="folder of a VLM from `slug world train-vlm` (default: the "
                                                      "shipped one; SLUG runs on its clip/ when it has one: --clip)")
    vg.add_argument("--vlm-gradient", default="clip", choices=["clip", "vlm"],
                    help="the edit: SLUG's CLIP forget gradient on the CLIP Pareto layers (clip, the paper's method; "
                         "default) or the VLM's own answer-loss gradient, projected off the other identities' and the "
                         "utility answers' gradients, on every consumed layer (vlm)")
    vg.add_argument("--vlm-name-prob", type=name_prob, default=0.1, metavar="P",
                    help="the step search counts a validation image as still naming the target when its answer "
                         "names it or the VLM gives the full and the last name a summed probability >= P, P in "
                         "(0, 1] (default 0.1: a margin for the unseen images; 'off': the answers only). The search's "
                         "criterion only: the test figures and the verdict are the answers'")
    vg.add_argument("--vlm-fallback", default=None, choices=["finetune"],
                    help="when every SLUG round refuses (no step forgets within the budgets, --max-layers "
                         "rounds), fine-tune one layer of the unedited VLM on its answers (Adam, 300 steps; 900 for "
                         "several --concepts; NOT SLUG): the deepest block's MLP (fc1 + fc2, SLUG's group of fc1: a "
                         "patch of 1.8%% of the CLIP's bytes, as SLUG's step there), then its attention output, "
                         "keeping the first that passes the same validation criteria; the run, its report and its "
                         "patch say method layer-finetune. Default: off (refuse)")
    vg.add_argument("--vlm-utility-budget", type=FRACTION, default=0.03,
                    help="search accepts a step only if the VLM's utility-question accuracy drops by at most this "
                         "(default 0.03; also the verdict's)")
    return vg
