"""Argument groups shared by several commands, and the one place where argument values are checked.

Each ``validate_*`` function returns the message of the first problem (printed as ``error: ...``, exit status 2,
by :func:`refuse`) or None; its command calls it before doing the work the arguments are for.
"""

from __future__ import annotations

import argparse
import sys


def add_search_args(p: argparse.ArgumentParser) -> None:
    """The step-size search options (spec §4) shared by demo and unlearn."""
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


def search_config(a):
    """The :class:`~slugkit.slug.search.SearchConfig` those options describe."""
    from ..slug.search import SearchConfig

    return SearchConfig(metric=a.criterion or "forget_top5", threshold=a.threshold, steps=a.steps, margin=a.margin,
                        utility_floor=a.utility_floor, selection=a.selection)


def add_run_args(p: argparse.ArgumentParser) -> None:
    """Output, seed, threads, device and progress options of a run, plus the search options."""
    p.add_argument("--out", required=False, default=None, help="output folder (refused if it holds a run)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--save-gradients", action="store_true", help="also write gradients.safetensors")
    add_search_args(p)


def split_list(spec: str) -> list[str]:
    """The non-empty, stripped items of a comma list ``A,B,C``."""
    return [c.strip() for c in spec.split(",") if c.strip()]


def refuse(msg: str) -> int:
    """Print ``error: MSG`` to stderr and return the usage-error exit status 2."""
    print(f"error: {msg}", file=sys.stderr)
    return 2


def validate_demo_sd(a) -> str | None:
    """`slug demo --target sd`: it takes one --concept, not --concepts."""
    if a.concepts:
        return "--target sd unlearns one concept (--concept)"
    return None


def validate_unlearn(a, concepts: list[str]) -> str | None:
    """`slug unlearn`: --out, a concept, and forget/retain data (or precomputed gradients) are required."""
    if not a.out:
        return "--out is required"
    if not concepts and not a.concept:
        return "pass --concept NAME (or --concepts A,B)"
    if not a.gradients and not (a.forget and a.retain):
        return "pass --forget and --retain (or precomputed --gradients)"
    return None


def validate_compare_data(a, concepts: list[str]) -> str | None:
    """`slug compare` with explicit data or a non-embedded model: the concept and the data flags are required."""
    missing = [f"--{k.replace('_', '-')}" for k in ("concept", "forget", "retain", "val_identities",
                                                    "test_identities") if not getattr(a, k)
               and not (k == "concept" and concepts)]
    if missing:
        return f"with explicit data (or a model other than 'embedded') compare needs {', '.join(missing)}"
    return None


def validate_curate(a) -> str | None:
    """`slug curate`: --generate needs -n; otherwise --shards and --concept are required."""
    if a.generate:
        if not a.n:
            return "--generate needs -n N (how many images)"
        return None
    if not (a.shards and a.concept):
        return "curate needs --shards and --concept (or --generate PROMPT -n N --pipeline P)"
    return None


def validate_apply(a) -> str | None:
    """`slug apply` / `slug revert`: at most one of --pipeline / --llava, and either one needs --out."""
    if a.pipeline and a.llava:
        return "give --pipeline or --llava, not both"
    if (a.pipeline or a.llava) and not a.out:
        flag = "--pipeline" if a.pipeline else "--llava"
        return f"{flag} needs --out DIR (the patched model folder is written there)"
    return None


def validate_eval_sd(concepts: list[str]) -> str | None:
    """`slug eval-sd`: the judge needs a concept list of at least two names."""
    if len(concepts) < 2:
        return "--concepts needs the concept list the judge chooses from (a file or A,B,C; >= 2 names)"
    return None
