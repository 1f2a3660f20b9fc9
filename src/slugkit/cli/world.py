"""``slug world names | train | data``: the embedded synthetic world (``train-t2i`` is dispatched in ``main``)."""

from __future__ import annotations

import json

from .args import COUNT, THREADS


def cmd_world(a) -> int:
    """`slug world ...`: print the identity names, train the embedded tiny CLIP, or write the world's data."""
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


def add_parsers(sub) -> None:
    """Add the `world` subcommand (names, train, data, train-t2i) to ``sub``."""
    w = sub.add_parser("world", help="the embedded synthetic world")
    wsub = w.add_subparsers(dest="world_cmd", required=True)
    wsub.add_parser("names", help="print the identity names")
    wt = wsub.add_parser("train", help="train the embedded tiny CLIP")
    wt.add_argument("--out", required=True, help="folder for open_clip_config.json, the weights and train_report.json")
    wt.add_argument("--steps", type=COUNT, default=None, help="training steps (default 3000)")
    wt.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    wt.add_argument("--threads", type=THREADS, default=None, help="torch CPU threads (default 1: bit-reproducible)")
    wdd = wsub.add_parser("data", help="write the world's shards and folders")
    wdd.add_argument("--out", default=None, help="folder to write (default: the cache dir the demos use)")
    wsub.add_parser("train-t2i", add_help=False,
                    help="train the embedded text-to-image UNet (`slug world train-t2i --help` for options)")
    w.set_defaults(func=cmd_world)
