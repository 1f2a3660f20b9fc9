"""``slug world names | train | train-vlm | data``: the embedded synthetic world (``train-t2i``: dispatched in
``main``)."""

from __future__ import annotations

import json
import os

from ..common.text import printable
from .args import COUNT, SEED, THREADS, float_at_least, int_in


def cmd_world(a) -> int:
    """`slug world ...`: print the identity names, train the embedded tiny CLIP, or write the world's data."""
    if a.world_cmd == "names":
        from ..world.render import identity_names

        print("\n".join(identity_names()))
        return 0
    if a.world_cmd == "train":
        from ..world.train import train_embedded

        kw = {k: v for k, v in (("steps", a.steps), ("threads", a.threads), ("vision_layers", a.vision_layers))
              if v is not None}
        report = train_embedded(a.out, seed=a.seed, overwrite=a.overwrite, progress=not a.no_progress, **kw)
        print(json.dumps(report, indent=2))
        return 0
    if a.world_cmd == "train-vlm":
        from ..world.vlm_train import VLMConfig, train_embedded_vlm

        cfg = VLMConfig(**{k: v for k, v in (("steps", a.steps), ("threads", a.threads), ("seed", a.seed),
                                              ("feature_noise", a.feature_noise),
                                              ("clip", a.clip and os.path.abspath(a.clip))) if v is not None})
        info = train_embedded_vlm(a.out, cfg, eval_images=a.eval_images, overwrite=a.overwrite,
                                  progress=not a.no_progress)
        ev = info.get("eval")
        print(f"wrote {printable(a.out)}: {info['steps_done']} steps in {info['train_s']} s" + (
            f"; test: named {ev['named']:.3f} (worst {ev['worst_identity']['name']} "
            f"{ev['worst_identity']['named']:.2f}), utility {ev['utility_accuracy']:.3f}" if ev else ""))
        return 0
    if a.world_cmd == "data":
        from ..common.outguard import own_entries
        from ..world.demo_data import ensure_world_data

        d = ensure_world_data(a.out, progress=not a.no_progress)
        own = own_entries(d)  # the manifest of what the world's writer put there; a user's files are named apart
        held = sorted(p.name + ("/" if p.is_dir() else "") for p in d.iterdir() if not p.name.startswith("."))
        print(f"world data in {d}: {', '.join(h for h in held if h.rstrip('/') in own)}" +
              "".join(f" (also there, not the world's: {', '.join(x)})" for x in
                      [[printable(h) for h in held if h.rstrip("/") not in own]] if x))
        return 0
    return 2


def add_parsers(sub) -> None:
    """Add the `world` subcommand (names, train, train-vlm, data, train-t2i) to ``sub``."""
    w = sub.add_parser("world", help="the embedded synthetic world")
    wsub = w.add_subparsers(dest="world_cmd", required=True)
    wsub.add_parser("names", help="print the identity names")
    wt = wsub.add_parser("train", help="train the embedded tiny CLIP")
    wt.add_argument("--out", required=True, help="folder for open_clip_config.json, the weights and train_report.json")
    wt.add_argument("--steps", type=COUNT, default=None, help="training steps (default 3000)")
    wt.add_argument("--seed", type=SEED, default=0, help="random seed (default 0)")
    wt.add_argument("--threads", type=THREADS, default=None, help="torch CPU threads (default 1: bit-reproducible)")
    wt.add_argument("--vision-layers", type=int_in(2, 24), default=None,
                    help="image-tower blocks, 2..24 (default 4, the shipped CLIP's; a VLM on an 8-block one: "
                         "train-vlm --clip, README)")
    wt.add_argument("--overwrite", action="store_true", help="replace a model this command wrote in --out (a folder "
                                                            "of other files is refused; your files in it are kept)")
    wt.add_argument("--no-progress", action="store_true", help="no progress bar")
    wv = wsub.add_parser("train-vlm", help="train the embedded VLM (LLaVA: the embedded CLIP's vision tower, a "
                                           "projector and a small Llama)")
    wv.add_argument("--out", required=True, help="folder for the model, its processor files and train_report.json")
    wv.add_argument("--steps", type=COUNT, default=None, help="training steps (default 3000)")
    wv.add_argument("--seed", type=SEED, default=None, help="random seed (default 0)")
    wv.add_argument("--threads", type=THREADS, default=None, help="torch CPU threads (default 1: bit-reproducible)")
    wv.add_argument("--feature-noise", type=float_at_least(0), default=None,
                    help="gaussian noise on the tower features during training, in per-channel stds (default: the "
                         "shipped model's)")
    wv.add_argument("--clip", default=None, help="a folder `slug world train --out DIR` wrote whose image tower the "
                                                 "VLM reads (copied into OUT/clip; default: the embedded CLIP)")
    wv.add_argument("--eval-images", type=int_in(0, 50), default=20,
                    help="test images per identity and object class for the report, 0..50 (0: no evaluation; "
                         "default 20)")
    wv.add_argument("--overwrite", action="store_true", help="replace a model this command wrote in --out (a folder "
                                                            "of other files is refused; your files in it are kept)")
    wv.add_argument("--no-progress", action="store_true", help="no progress bar")
    wdd = wsub.add_parser("data", help="write the world's shards and folders")
    wdd.add_argument("--out", default=None, help="folder to write (default: the cache dir the demos use)")
    wdd.add_argument("--no-progress", action="store_true", help="no progress bar")
    wsub.add_parser("train-t2i", add_help=False,
                    help="train the embedded text-to-image UNet (`slug world train-t2i --help` for options)")
    wsub.add_parser("train-canvas", add_help=False,
                    help="train the embedded canvas (UNet + style/object judges; `slug world train-canvas --help`)")
    w.set_defaults(func=cmd_world)


def world_ignored(a) -> str | None:
    """Why `slug unlearn --model embedded` without data flags (the embedded world's data, as `slug demo`) cannot take
    ``a``'s options: those that describe data or a model the world run does not use were dropped silently
    (thirteenth trial: --identity-template, --related-names, --family hf_clip); None when it can. ``--pretrained``
    is passed on (a checkpoint of the embedded model's architecture)."""
    given = [flag for flag, value in (("--family", a.family not in (None, "open_clip")), ("--consumer", a.consumer),
                                      ("--clip-skip", a.clip_skip is not None),  # 0 passed silently
                                      ("--identity-template", a.identity_template),
                                      ("--related-names", a.related_names),
                                      ("--utility-classnames", a.utility_classnames),
                                      ("--utility-templates", a.utility_templates != "imagenet-simple"),
                                      ("--alias", getattr(a, "alias", None)),
                                      ("--train-identities", getattr(a, "train_identities", None)))
             if value]
    if not given:
        return None
    verb = "describes" if len(given) == 1 else "describe"
    return (f"{', '.join(given)} {verb} data or a model that a run on the embedded world's data does not use; "
            "pass the data flags (--forget, --retain, --val-identities, --test-identities, …) to use them, or leave "
            "them out")
