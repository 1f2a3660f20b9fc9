"""``slug``: the command-line entry point.

    slug demo [--concept NAME] [--out DIR]           SLUG on the embedded world (no downloads)
    slug unlearn --model M --concept C --forget ... --out DIR
    slug curate --shards SPEC --concept NAME --out DIR
    slug grads --model M --forget SPEC --retain SPEC --out G.safetensors   (also under torchrun)
    slug compare [--concept NAME] [--methods slug,ft,ga,gaft,salun,ssd] --out DIR
    slug apply / revert / inspect                    patches
    slug world names | train | data                  the embedded synthetic world

Each command group lives in its own module (``run``: demo, unlearn; ``compare``; ``data``: curate, grads;
``patches``: apply, revert, eval-sd, inspect; ``world``), which adds its subparsers; ``args`` holds the shared
argument groups and the argument checks.
"""

from __future__ import annotations

import argparse
import sys

from ..common.errors import check_device, device_error_hint
from . import compare, data, patches, run, world

__all__ = ["build_parser", "check_device", "device_error_hint", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``slug`` argument parser, with every command's subparser (in the order `slug --help` lists them)."""
    p = argparse.ArgumentParser(prog="slug", description="Targeted unlearning with SLUG: edit one layer once.")
    sub = p.add_subparsers(dest="cmd", required=True)
    run.add_parsers(sub)  # demo, unlearn
    compare.add_parsers(sub)  # compare
    data.add_parsers(sub)  # curate, grads
    patches.add_parsers(sub)  # apply, revert, eval-sd, inspect
    world.add_parsers(sub)  # world names | train | data | train-t2i
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``slug ARGS``: parse, check --device, dispatch; user errors print `error: ...` and return 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["world", "train-t2i"]:  # its own argparse (python -m slugkit.world.t2i_train)
        from ..world.t2i_train import main as t2i_main

        return t2i_main(argv[2:])
    parser = build_parser()
    a = parser.parse_args(argv)
    from ..common.errors import EmptyForgetSetError, ModelLoadError, OutputExistsError, ShardError
    from ..patch import PatchError
    from ..slug.search import SearchFailed

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

