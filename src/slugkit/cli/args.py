"""Argument groups shared by several commands, and the one place where argument values are checked.

Each ``validate_*`` function returns the message of the first problem (printed as ``error: ...``, exit status 2,
by :func:`refuse`) or None; its command calls it before doing the work the arguments are for.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from ..common.argv import SlugParser  # noqa: F401 (one-line errors; shared with the trainers' parsers)
from ..common.argv import seed as SEED  # noqa: F401 (every --seed; shared with the trainers' parsers)


# --------------------------------------------------------------------------------------------- value checks
# argparse ``type=`` callables: a bad value is refused at parse time with a one-line message naming the flag
# (``error: argument --threshold: must be in [0, 1), got 1.0``), before any model or data is loaded.


def _number(kind, text: str):
    try:
        v = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
    if kind is float and not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return v


def int_at_least(lo: int):
    """An integer >= ``lo``."""
    def check(text: str) -> int:
        v = _number(int, text)
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v
    check.__name__ = f"integer >= {lo}"
    return check


def fraction_or_off(text: str) -> float | None:
    """A fraction in [0, 1], or ``off`` (None)."""
    if text.strip().lower() in ("off", "none"):
        return None
    try:
        return FRACTION(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e}; or 'off'") from None


fraction_or_off.__name__ = "fraction or off"


def int_in(lo: int, hi: int):
    """An integer in [lo, hi]."""
    def check(text: str) -> int:
        v = _number(int, text)
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be in [{lo}, {hi}], got {v}")
        return v
    check.__name__ = f"integer in [{lo}, {hi}]"
    return check


def float_in(lo: float, hi: float, hi_open: bool = False):
    """A number in [lo, hi] (or [lo, hi) with ``hi_open``)."""
    def check(text: str) -> float:
        v = _number(float, text)
        if not (lo <= v and (v < hi if hi_open else v <= hi)):
            raise argparse.ArgumentTypeError(f"must be in [{lo:g}, {hi:g}{')' if hi_open else ']'}, got {v:g}")
        return v
    check.__name__ = "number"
    return check


def float_at_least(lo: float):
    """A number >= ``lo``."""
    def check(text: str) -> float:
        v = _number(float, text)
        if not v >= lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo:g}, got {v:g}")
        return v
    check.__name__ = "number"
    return check


def nonempty(text: str) -> str:
    """A non-blank string, stripped (an unset shell variable gives ``--concept ""``)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty")
    return text.strip()


def item_list(text: str) -> str:
    """A comma list ``A,B,...`` of at least one non-blank item, none given twice (case-insensitive): ``--methods ""``
    ran nothing and exited 0, ``--concepts A,A`` unlearned A as two concepts (new-user trial). Returned as given;
    split with :func:`split_list`."""
    items = split_list(text)
    if not items:
        raise argparse.ArgumentTypeError(f"is empty ({text!r}); give a comma list, or leave the option out for its "
                                         "default")
    if len(items) != len(text.split(",")):  # `A,,B` or `A,`: a value lost (an unset variable in `$A,$B`?)
        raise argparse.ArgumentTypeError(f"has an empty item ({text!r}); give each item once, separated by commas")
    seen = {}
    for item in items:
        if item.casefold() in seen:
            raise argparse.ArgumentTypeError(f"{item!r} is given twice")
        seen[item.casefold()] = item
    return text


def name_list(text: str) -> str:
    """A comma list ``A,B`` naming at least two distinct non-blank items (returned as given; split with
    :func:`split_list`)."""
    items = split_list(item_list(text))
    if len(items) < 2:
        raise argparse.ArgumentTypeError(f"needs at least two comma-separated names, got {text!r}")
    return text


def text_file(*keywords: str):
    """An argparse type: one of ``keywords``, or a text file that exists (a folder was read as one: "W/val/utility:
    Is a directory", naming no option; ninth trial)."""
    def check(text: str) -> str:
        if text in keywords:
            return text
        if os.path.isdir(text):
            raise argparse.ArgumentTypeError(f"{text} is a folder; give a text file, one entry per line")
        if not os.path.isfile(text):
            raise argparse.ArgumentTypeError(f"{text}: no such file" + f" (or: {', '.join(keywords)})" * bool(keywords))
        return text
    return check


def template(text: str) -> str:
    """A prompt template holding ``{}`` where the name goes (without it every class gets the same prompt)."""
    if "{}" not in text:
        raise argparse.ArgumentTypeError(f"must contain {{}} where the name goes, got {text!r}")
    try:
        text.format("x")
    except (IndexError, KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"must hold exactly one {{}} (other braces doubled: {{{{ }}}}), got {text!r}")
    return text


def method_lr(text: str) -> str:
    """``METHOD=LR`` with a positive learning rate."""
    method, eq, lr = text.partition("=")
    if not eq or not method.strip():
        raise argparse.ArgumentTypeError(f"expected METHOD=LR (e.g. gaft=2e-4), got {text!r}")
    if not _number(float, lr) > 0:
        raise argparse.ArgumentTypeError(f"the learning rate must be > 0, got {lr!r}")
    return text


def deprecated_alias(new_flag: str):
    """An argparse action for an old spelling: stores into the new option's dest and warns on stderr."""
    class Deprecated(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            print(f"warning: {option_string} is deprecated; use {new_flag}", file=sys.stderr)
            setattr(namespace, self.dest, values)
    return Deprecated


FRACTION = float_in(0.0, 1.0)
THRESHOLD = float_in(0.0, 1.0, hi_open=True)
THREADS = int_at_least(1)
COUNT = int_at_least(1)
BATCH = int_at_least(2)  # the retain loss is contrastive: a batch of one pair has a zero gradient (trust case A6)


def add_search_args(p: argparse.ArgumentParser) -> None:
    """The step-size search options (paper §3.3) shared by demo and unlearn."""
    g = p.add_argument_group("step-size search (paper §3.3, Algorithm 3)")
    g.add_argument("--criterion", default=None, choices=["forget_top5", "forget_top1"],
                   help="validation metric that must reach --threshold (default: forget_top5, the official rule; "
                        "forget_top1 for `demo --target sd`, whose 30-way concept list is short)")
    g.add_argument("--threshold", type=THRESHOLD, default=0.0,
                   help="the criterion holds when the validation metric is <= this, in [0, 1) (default 0)")
    g.add_argument("--steps", type=COUNT, default=10, help="evaluations per layer, S (default 10)")
    g.add_argument("--margin", type=float_at_least(1.0), default=1.1,
                   help="applied step = margin x smallest accepted step (default 1.1; 1.0 = official rule)")
    g.add_argument("--utility-floor", type=FRACTION, default=None,
                   help="also require validation utility top-1 >= base - FLOOR (e.g. 0.01)")
    g.add_argument("--selection", default="min", choices=["min", "utility", "mean", "deepest"],
                   help="how to choose among Pareto layers (default min: best worst-case retention of validation "
                        "utility and related-identity accuracy)")
    g.add_argument("--naive-search", action="store_true",
                   help="re-evaluate both towers at every step instead of the cached search (for checking)")
    g.add_argument("--protect-neighbours", type=int_in(0, 50), default=10, metavar="K",
                   help="project the step off the K nearest identities' own alignment gradients, so the edit leaves "
                        "them unchanged to first order, K in [0, 50] (default 10; 0 = the paper's step)")
    g.add_argument("--max-layers", type=int_in(1, 3), default=None,  # None: 2 (read as a.max_layers or 2)
                   help="when no single layer forgets within the budgets, edit up to this many layers (1-3), "
                        "recomputing the gradients after each (default 2; 1 = the paper's single layer). With "
                        "--target sd/vlm: judged on the generated images / the VLM's answers, and 1 = refuse rather "
                        "than add a layer (or, with --sd/--vlm-fallback finetune, fine-tune after that one round); "
                        "a patch of several SLUG layers stays within 1%% of the CLIP's bytes")


def search_config(a):
    """The :class:`~slugkit.slug.search.SearchConfig` those options describe."""
    from ..slug.search import SearchConfig

    return SearchConfig(metric=a.criterion or "forget_top5", threshold=a.threshold, steps=a.steps, margin=a.margin,
                        utility_floor=a.utility_floor, selection=a.selection, worst_budget=a.worst_budget)


def step_options(a) -> dict:
    """The :class:`~slugkit.workflows.unlearn.UnlearnConfig` fields of the neighbour-safe step and the multi-layer
    fallback."""
    return {"protect_neighbours": a.protect_neighbours, "max_layers": max_layers(a)}


def max_layers(a) -> int:
    """``--max-layers`` as given, else its default 2 (the parser keeps None so a demo can tell "not given")."""
    return a.max_layers or 2


def add_run_args(p: argparse.ArgumentParser, threads: int | None = None, out_default: str = "") -> None:
    """Output, seed, threads, device and progress options of a run, plus the search options. ``threads``: the
    command's default thread count (None: torch's choice); ``out_default``: how the default --out is named."""
    p.add_argument("--out", required=False, default=None,
                   help="output folder (refused if it holds a run" + (f"; default {out_default}" if out_default else "")
                        + ")")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--batch-size", type=BATCH, default=64,
                   help="pairs per batch of the gradient pass, >= 2: the retain loss is contrastive (default 64; the "
                        "official script uses 16)")
    p.add_argument("--seed", type=SEED, default=0, help="random seed (default 0)")
    p.add_argument("--threads", type=THREADS, default=threads,
                   help="torch CPU threads (default: "
                        + ("1 for --model embedded on the CPU, as `slug demo`; else torch's choice)" if threads is None
                           else f"{threads}: as fast for the tiny model, and bit-identical everywhere)"))
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--save-gradients", action="store_true", help="also write gradients.safetensors")
    add_search_args(p)
    add_verdict_args(p)


def add_verdict_args(p: argparse.ArgumentParser) -> None:
    """The budgets of the run's verdict (:mod:`slugkit.workflows.verdict`)."""
    g = p.add_argument_group("verdict (exit status 0 pass, 3 warn, 4 fail; 2 a usage error or a refusal: no layer "
                              "and step met the criteria, no patch written; 130 interrupted, 143 terminated)")
    g.add_argument("--forget-tolerance", type=float_in(0.0, 0.5, hi_open=True), default=0.05,
                   help="fail when the test criterion metric exceeds --threshold by more than this, or FA@1 exceeds "
                        "it, in [0, 0.5) (default 0.05)")
    g.add_argument("--utility-budget", type=FRACTION, default=0.02,
                   help="warn when utility top-1 (TA_IN@1) drops by more than this (default 0.02)")
    g.add_argument("--related-budget", type=FRACTION, default=0.05,
                   help="warn when other-identity top-1 (TA_CA@1) drops by more than this (default 0.05)")
    g.add_argument("--worst-budget", type=fraction_or_off, default=0.20,
                   help="the most any single other identity may lose, in [0, 1]: the layer choice keeps it on "
                        "validation and the verdict warns when a test drop exceeds it (default 0.20; off: the "
                        "paper's layer choice, no such warning)")


def budgets_of(a):
    """The verdict :class:`~slugkit.workflows.verdict.Budgets` those options give."""
    from ..workflows.verdict import Budgets

    return Budgets(forget_tolerance=a.forget_tolerance, utility_drop=a.utility_budget, related_drop=a.related_budget,
                   worst_drop=1.0 if a.worst_budget is None else a.worst_budget)  # off: a drop never exceeds 1


def split_list(spec: str) -> list[str]:
    """The non-empty, stripped items of a comma list ``A,B,C``."""
    return [c.strip() for c in spec.split(",") if c.strip()]


def data_dir_conflict(a) -> str | None:
    """``--data-dir`` and ``--out`` must not overlap: the run curated into OUT/data over the world's (and the user's)
    files and then refused, or deleted the world it had read (third new-user trial)."""
    if getattr(a, "data_dir", None) is None or getattr(a, "out", None) is None:
        return None
    d, o = os.path.realpath(a.data_dir), os.path.realpath(a.out)
    if d == o or d.startswith(o + os.sep) or o.startswith(d + os.sep):
        return (f"--data-dir {a.data_dir} and --out {a.out} overlap; the world's data and a run each need a folder "
                "of their own")
    return None


def demo_conflicts(a) -> str | None:
    """`slug demo` options that contradict each other (--concept beside --concepts: refused for every command in
    :func:`slugkit.cli.main`): --sequential without --concepts (ignored), --data-dir overlapping --out."""
    if a.sequential and not a.concepts:
        return "--sequential unlearns the --concepts one after another; give --concepts A,B"
    return data_dir_conflict(a)


def refuse(msg: str) -> int:
    """Print ``error: MSG`` to stderr and return the usage-error exit status 2."""
    from ..common.text import printable

    print(f"error: {printable(msg)}", file=sys.stderr)  # a newline in a path split the one-line error
    return 2


def validate_demo_sd(a) -> str | None:
    """`slug demo --target sd`: it takes one --concept, not --concepts."""
    if a.concepts:
        return "--target sd unlearns one concept (--concept)"
    if getattr(a, "null_space_layers", "front") != "front" and a.sd_step != "null-space":
        return "--null-space-layers all needs --sd-step null-space (the slug step searches the CLIP Pareto layers)"
    if getattr(a, "null_space_energy", None) is not None and a.sd_step != "null-space":
        return "--null-space-energy needs --sd-step null-space (the slug step projects nothing)"
    if a.no_gen_search:  # the generator search's options ran without a word (trial 40)
        stray = [f"--{k.replace('_', '-')}" for k in ("val_images", "val_other", "val_neighbour", "neighbour_budget",
                                                      "max_searched", "gen_threshold", "sd_fallback")
                 if getattr(a, k) != a.generator_defaults[k]]  # the parser's defaults
        if stray:
            return (f"{', '.join(stray)}: option(s) of the search on generated images, which --no-gen-search "
                    "turns off; drop them (or --no-gen-search)")
    return None


def world_mode(a) -> bool:
    """`slug unlearn --model embedded` with no data flag at all runs on the embedded world's data (like `slug demo`)."""
    return a.model == "embedded" and not any((a.forget, a.retain, a.gradients, a.val_identities, a.test_identities,
                                              a.names, a.utility_val, a.utility_test))


def validate_unlearn(a, concepts: list[str]) -> str | None:
    """`slug unlearn`: --out and a concept are required; forget/retain data (or precomputed gradients) and the
    validation/test folders too, unless it runs on the embedded world's data (:func:`world_mode`)."""
    if not a.out:
        return "--out is required"
    if not concepts and a.concept is None:
        return "pass --concept NAME (or --concepts A,B)"
    if world_mode(a):
        return None
    if not (a.forget and a.retain):
        return "pass --forget and --retain" + (" too: the pairs the --gradients were computed on" * bool(a.gradients))
    missing = [f for f, v in (("--val-identities", a.val_identities), ("--test-identities", a.test_identities))
               if not v]
    if missing:
        world = (" — with --model embedded, the world's DATA/val/identities and DATA/test/identities, from `slug world "
                 "data --out DATA`" if a.model == "embedded" else "")  # named nowhere (trial 40)
        return (f"pass {' and '.join(missing)} (class folders <Name>/*.jpg for the search and the reported "
                f"metrics{world})")
    return None


def validate_compare_data(a, concepts: list[str]) -> str | None:
    """`slug compare` with explicit data or a non-embedded model: the concept and the data flags are required."""
    missing = [f"--{k.replace('_', '-')}" for k in ("concept", "forget", "retain", "val_identities",
                                                    "test_identities") if not getattr(a, k)
               and not (k == "concept" and concepts)]
    if missing:
        return f"with explicit data (or a model other than 'embedded') compare needs {', '.join(missing)}"
    return None


def validate_apply(a, revert: bool = False) -> str | None:
    """`slug apply` / `slug revert`: at most one of --pipeline / --llava, and either one needs --out; then the target
    checks of :func:`_apply_target`."""
    if a.pipeline and a.llava:
        return "give --pipeline or --llava, not both"
    if (a.pipeline or a.llava) and not a.out:
        flag = "--pipeline" if a.pipeline else "--llava"
        return f"{flag} needs --out DIR (the patched model folder is written there)"
    return _apply_target(a, revert)


def _apply_target(a, revert: bool) -> str | None:
    """What is wrong with the target options of `slug apply` / `slug revert`, or None: one of --model, --checkpoint,
    --pipeline, --llava is needed (no silent default model); --clip-skip is for --pipeline; a file --out is a file
    (whether it may be replaced: :func:`out_file_taken`, later)."""
    cmd = "revert" if revert else "apply"
    if not (a.model or a.checkpoint or a.pipeline or a.llava):
        return f"slug {cmd} needs --model M (or --checkpoint FILE, --pipeline DIR, --llava DIR)"
    if a.model and a.checkpoint:
        return "give --model or --checkpoint, not both"
    if (a.pipeline or a.llava) and (a.model or a.checkpoint):
        return (f"{'--pipeline' if a.pipeline else '--llava'} reads the model from that folder; drop "
                "--model/--checkpoint")
    given = [f for f, v in (("--pretrained", a.pretrained), ("--family", a.family)) if v is not None]
    if given and not a.model:  # they describe --model; with --checkpoint or a folder they were dropped silently
        return f"{given[0]} goes with --model (it describes the model to load); drop it here"
    pipe_only = [f for f, v in (("--full-pipeline", a.full_pipeline), ("--text-encoder", a.text_encoder)) if v]
    if pipe_only and not a.pipeline:
        return f"{pipe_only[0]} applies to --pipeline only (it was ignored here)"
    if a.clip_skip is not None and (not a.pipeline or a.clip_skip < 0):
        return ("--clip-skip must be >= 0" if a.pipeline else
                "--clip-skip applies to --pipeline only (how the pipeline reads its text encoder)")
    if a.out and not (a.pipeline or a.llava) and Path(a.out).is_dir():
        return f"--out {a.out} is a folder; give the .safetensors file to write"
    return None
