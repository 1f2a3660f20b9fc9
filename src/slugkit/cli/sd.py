"""``slug demo --target sd``: its argument group and the command (split from :mod:`slugkit.cli.run`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..workflows.verdict import exit_status_of
from .args import COUNT, FRACTION, budgets_of, float_at_least, max_layers, refuse, search_config, validate_demo_sd


def _energy(text: str) -> float:
    """`--null-space-energy`: a share in (0, 1]."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {v:g}")
    return v


def cmd_demo_sd(a) -> int:
    """`slug demo --target sd`: unlearn an object concept from the embedded text-to-image pipeline."""
    from dataclasses import replace

    from ..report.sd import print_sd_summary
    from ..workflows.sd_demo import DEFAULT_SD_CONCEPT, SD_CRITERION, run_sd_demo
    from ..world.t2i import concept_by_name

    from .vlm import unused

    msg = validate_demo_sd(a) or unused(a, a.vlm_defaults, "--target vlm", "--target sd")
    if msg:
        return refuse(msg)
    try:
        concept = concept_by_name(a.concept if a.concept is not None else DEFAULT_SD_CONCEPT).name
    except ValueError as e:
        print(f"error: --concept: {e}", file=sys.stderr)
        return 2
    out = a.out if a.out is not None else f"runs/demo-sd-{concept.replace(' ', '_')}"
    search = replace(search_config(a), metric=a.criterion or SD_CRITERION)
    result = run_sd_demo(concept, out, data_dir=a.data_dir, t2i_dir=a.t2i_model, n_target=a.n_target,
                         n_other=a.n_other, gen_steps=a.gen_steps, guidance=a.guidance, selection=a.sd_selection,
                         gen_search=not a.no_gen_search, val_images=a.val_images or 20, val_other=a.val_other,
                         gen_threshold=a.gen_threshold, other_budget=a.other_budget,
                         gen_margin=a.gen_margin, search=search, seed=a.seed, threads=a.threads,
                         progress=not a.no_progress, overwrite=a.overwrite, batch_size=a.batch_size,
                         budgets=budgets_of(a), n_neighbour=a.n_neighbour, val_neighbour=a.val_neighbour,
                         neighbour_budget=a.neighbour_budget, step=a.sd_step, null_energy=a.null_space_energy,
                         null_layers=a.null_space_layers, max_searched=a.max_searched, max_layers=max_layers(a),
                         fallback=a.sd_fallback, protect_neighbours=a.protect_neighbours)
    print_sd_summary(result, out)
    rc = exit_status_of(result)
    if a.audit and (Path(out) / "patch" / "patch.json").is_file():
        from .audit import AUDIT_EXIT, audit_sd, said_audit

        res = said_audit(out, audit_sd(Path(out) / "patch", Path(out), a))
        rc = max(rc, AUDIT_EXIT[res["status"]])
    return rc



def add_sd_args(d) -> argparse._ArgumentGroup:
    """The ``--target sd`` argument group of ``slug demo``."""
    sdg = d.add_argument_group("--target sd")
    sdg.add_argument("--n-target", type=COUNT, default=50,
                     help="generated images of the forgotten concept (default 50)")
    sdg.add_argument("--n-other", type=COUNT, default=10,
                     help="generated images per other concept (29 of them; default 10)")
    sdg.add_argument("--gen-steps", type=COUNT, default=20, help="DDIM steps (default 20)")
    sdg.add_argument("--guidance", type=float_at_least(0.0), default=3.0,
                     help="classifier-free guidance scale (default 3)")
    sdg.add_argument("--sd-selection", default="shift", choices=["shift", "neighbour", "clip"],
                     help="order in which the searched Pareto layers are tried: shift (least conditioning shift of "
                          "the other concepts relative to the target's; default), neighbour (least shift of the 5 "
                          "nearest neighbours relative to the target's) or clip (the CLIP --selection policy first)")
    sdg.add_argument("--no-gen-search", action="store_true",
                     help="apply the CLIP-searched step x --gen-margin (default 1.2) instead of searching it on "
                          "generated validation images")
    sdg.add_argument("--val-images", type=COUNT, default=None,
                     help="validation images of the concept per search step: generated (--target sd, default 20) or "
                          "asked about (--target vlm, default 10)")
    sdg.add_argument("--val-other", type=COUNT, default=1,
                     help="generated validation images per other concept per search step (default 1)")
    sdg.add_argument("--n-neighbour", type=COUNT, default=20,
                     help="generated images of each of the 5 concepts nearest the forgotten one (by the pipeline's "
                          "text encoder), reported per concept next to the mean (default 20)")
    sdg.add_argument("--val-neighbour", type=COUNT, default=20,
                     help="generated validation images per nearest neighbour per search step (default 20)")
    sdg.add_argument("--neighbour-budget", type=FRACTION, default=None,
                     help="search accepts a step only if no nearest neighbour's validation recognition drops by more "
                          "than this (default: the verdict's worst-drop budget, 0.2)")
    sdg.add_argument("--sd-step", default="slug", choices=["slug", "null-space"],
                     help="slug: theta - step * g (default); null-space: g projected so that the edited layer's "
                          "outputs on the other concepts' prompts stay unchanged (to --null-space-energy)")
    sdg.add_argument("--null-space-energy", type=_energy, default=None,
                     help="with --sd-step null-space: share of the kept prompts' activation energy the protected "
                          "subspace holds, in (0, 1] (default 0.999)")
    sdg.add_argument("--null-space-layers", default="front", choices=["front", "all"],
                     help="with --sd-step null-space: the CLIP Pareto layers that forgot (front, default) or every "
                          "Linear group of the text tower the pipeline reads (all; 19 of 28 concepts passed the "
                          "README's neighbour-safe criteria with it, 20 with a second layer)")
    sdg.add_argument("--sd-fallback", default=None, choices=["finetune"],
                     help="when every SLUG round refuses (no step forgets within the budgets, --max-layers rounds), "
                          "fine-tune one layer of the text encoder on the generator (Adam, 600 steps, ESD's "
                          "objective; NOT SLUG): layer 2's attention (q, k, v, out_proj), then layer 2's fc1, then "
                          "layer 3's, keeping the first "
                          "that passes the same validation criteria; the run, its report and its patch say method "
                          "layer-finetune. Default: off (refuse)")
    sdg.add_argument("--max-searched", type=COUNT, default=None,
                     help="the generator search tries at most this many layers, most selective first (default all)")
    sdg.add_argument("--other-budget", type=FRACTION, default=0.05,
                     help="search accepts a step only if the other concepts' validation recognition drops by at "
                          "most this much (default 0.05; also the verdict's budget on the test images)")
    sdg.add_argument("--gen-threshold", type=FRACTION, default=0.05,
                     help="search accepts a step when at most this share of validation images is recognised "
                          "(default 0.05)")
    sdg.add_argument("--gen-margin", type=float_at_least(1.0), default=None,
                     help="applied step = this x the smallest step that forgot on validation (default 1.2)")
    sdg.add_argument("--t2i-model", default=None, help="folder of a text-to-image UNet from `slug world train-t2i`")
    return sdg
