"""``slug canvas lite``: UnlearnCanvas on the embedded canvas (:mod:`slugkit.workflows.canvas_lite`);
``slug canvas run``: the official protocol on a local UnlearnCanvas (:mod:`slugkit.workflows.canvas_official`).

    slug canvas lite [--methods slug,slug-null-space,esd,salun,uce] [--targets A,B | --max-targets N]
                     [--per-pair 2] --out DIR
    slug canvas run --pipeline DIR --clip DIR --classifiers DIR --data DIR [--targets ...] --out DIR

Writes ``canvas.json`` (every run and the per-method table; ``time_s``, ``peak_mem_bytes``, ``storage_bytes`` per
method), ``canvas.md`` and ``canvas.png`` into ``--out`` at once (a temporary folder renamed into place). Exit
status 0 (a refused SLUG search is a row of the table), 3 when the judges recognise a target on none of the unedited
model's images (written, with a warning), or 2 for a usage or input error (nothing written).
"""

from __future__ import annotations

from ..common.text import did_you_mean, printable
from .args import COUNT, SEED, THREADS, item_list, refuse, split_list


def _check(a, grid) -> str | None:
    """The usage error of the shared options, or None."""
    from ..workflows.canvas_lite import METHODS, baseline_limit_error, choose_targets, limit_does_nothing

    methods = split_list(a.methods)
    bad = [m for m in methods if m not in METHODS]
    if not methods:
        return f"--methods: empty; choose from {', '.join(METHODS)}"
    if bad:
        return f"--methods: unknown {bad[0]!r}; {did_you_mean(bad[0], METHODS)}choose from {', '.join(METHODS)}"
    if a.targets is not None and not split_list(a.targets):
        return "--targets: empty; name styles and/or objects, or leave the option out for every one"
    targets = split_list(a.targets) if a.targets else []
    for flag, given in (("--methods", methods), ("--targets", targets)):
        twice = [n for n in given if given.count(n) > 1]
        if twice:
            return f"{flag}: {twice[0]!r} is given twice"
    unknown = [t for t in targets if t not in grid.styles + grid.objects]
    if unknown:
        return (f"--targets: unknown {unknown[0]!r}; {did_you_mean(unknown[0], grid.styles + grid.objects)}styles: "
                f"{', '.join(grid.styles)}; objects: "
                f"{', '.join(grid.objects)}")
    if targets and a.max_targets is not None:
        return "--targets and --max-targets exclude each other"
    why = limit_does_nothing(choose_targets(None, None, grid), a.max_targets, grid, "--max-targets")
    if why:
        return why
    for flag, method in (("--esd-iterations", "esd"), ("--salun-steps", "salun")):  # dropped silently (20th trial)
        if getattr(a, flag[2:].replace("-", "_")) is not None and method not in methods:
            return f"{flag} sets {method}'s budget, and --methods {','.join(methods)} does not run {method}"
    return baseline_limit_error(methods, a.baseline_max_targets, "--baseline-max-targets", grid) or limit_does_nothing(
        choose_targets(targets or None, a.max_targets, grid), a.baseline_max_targets, grid, "--baseline-max-targets")


def _run_and_write(a, run, prepare=None, models: dict | None = None) -> int:
    """Refuse an ``--out`` inside the slugkit package or one of ``models`` (``{"--flag": folder the run reads}``;
    both canvas commands wrote canvas.* beside the shipped canvas UNet, trial 51, which `slug demo` refuses), claim
    ``--out`` (an existing run is refused before any work), ``prepare()`` (loading; its
    ``FileNotFoundError``/``ValueError`` is a usage error), run, write JSON + markdown + plot at once. Exit status 0,
    or 3 (a warning, as a run's ``warn`` verdict) when the judges recognise a target on none of the unedited
    model's answer-set images: its UA reads 100 % for any method (trial 51: a script checking the status took it as a
    result)."""
    from ..common.files import atomic_write_bytes, write_json
    from ..common.outlock import claim_out
    from ..common.outputs import out_inside_model
    from ..common.runfolder import run_folder
    from ..report.canvas import canvas_plot, render_canvas
    from ..workflows.canvas_lite import row_line
    from ..workflows.verdict import EXIT_STATUS

    why = out_inside_model(a.out, models or {})
    if why:
        return refuse(why)
    claim_out(a.out, a.overwrite, "canvas.json")
    state = None
    if prepare is not None:
        try:
            state = prepare()
        except (FileNotFoundError, ValueError) as e:
            return refuse(str(e))

    def line(row):
        if not a.no_progress:
            print(row_line(row), flush=True)

    report = run(line, state)
    ran = split_list(a.methods)  # said in canvas.md too (eleventh trial); only for the methods that ran
    report["options"]["overridden"] = {m: kv for m, kv in _settings(a).items() if m in ran}
    with run_folder(a.out, a.overwrite, marker="canvas.json") as stage:
        write_json(stage / "canvas.json", report)
        atomic_write_bytes(stage / "canvas.md", render_canvas(report).encode())
        canvas_plot(report, stage / "canvas.png")
    print(f"wrote {printable(a.out)}/canvas.json, canvas.md, canvas.png")
    gone = report["base"].get("unrecognised_targets") or []
    if gone:
        import sys

        from ..report.canvas import unrecognised_warning

        said = unrecognised_warning([printable(g) for g in gone], protocol=report.get("protocol"))
        print(f"warning: {said} (exit status {EXIT_STATUS['warn']})", file=sys.stderr)
        return EXIT_STATUS["warn"]
    return 0


def _settings(a) -> dict:
    """``--esd-iterations`` / ``--salun-steps`` over the defaults."""
    out = {}
    if a.esd_iterations is not None:
        out["esd"] = {"iterations": a.esd_iterations}
    if a.salun_steps is not None:
        out["salun"] = {"steps": a.salun_steps}
    return out


def cmd_canvas(a) -> int:
    from ..world import canvas
    from ..workflows.canvas_lite import run_canvas_lite

    err = _check(a, canvas.EMBEDDED)
    if err:
        return refuse(err)
    targets = split_list(a.targets) if a.targets else None

    def run(line, _):
        r = run_canvas_lite(split_list(a.methods), targets, a.max_targets, a.per_pair, a.canvas_model, a.seed,
                            a.threads, progress=not a.no_progress, on_row=line, steps=a.sampling_steps,
                            baseline_max_targets=a.baseline_max_targets, settings=_settings(a))
        return {"protocol": "lite", **r}

    return _run_and_write(a, run, models={"--canvas-model": a.canvas_model})


def cmd_canvas_run(a) -> int:
    import math
    from pathlib import Path

    import torch

    from ..workflows import canvas_official as off
    from ..workflows.canvas_lite import run_protocol

    styles = split_list(a.styles) if a.styles is not None else list(off.STYLE_LABELS)
    objects = split_list(a.objects) if a.objects is not None else list(off.OBJECTS20)
    targets = split_list(a.targets) if a.targets else None
    err = off.check_grid(styles, objects, targets)
    if err:
        return refuse(err)
    seeds = None
    if a.seeds is not None:
        try:
            seeds = [int(x) for x in split_list(a.seeds)]
        except ValueError:
            seeds = []
        if not seeds or any(not 0 <= x < 2 ** 63 for x in seeds) or len(set(seeds)) != len(seeds):
            return refuse(f"--seeds: {a.seeds!r} is not a comma list of distinct integers in [0, 2^63) (official: "
                          "188,288,588,688,888)")
    if not math.isfinite(a.guidance) or a.guidance < 0:
        return refuse(f"--guidance must be a finite number >= 0 (official 9.0), got {a.guidance}")
    err = _check(a, off.Grid(styles, objects, capitalize=False, not_targets=["Seed_Images"]))  # as the run's grid
    # (without it, Seed_Images counted as a target: a --max-targets that limits nothing ran; twenty-first trial)
    if err:
        return refuse(err)
    if a.threads:
        torch.set_num_threads(a.threads)
    paths = {k: str(Path(getattr(a, k)).resolve()) for k in ("pipeline", "clip", "classifiers", "data")}
    out = Path(a.out).resolve()
    for k, given in paths.items():  # canvas.* was written into the dataset or the pipeline (trial 38)
        if out == Path(given) or Path(given) in out.parents:
            return refuse(f"--out {printable(a.out)} is inside --{k} {printable(getattr(a, k))}, a folder this run "
                          "reads; write the run elsewhere")

    def prepare():
        return off.official_context(paths["pipeline"], paths["clip"], paths["classifiers"], paths["data"],
                                    styles=styles, objects=objects, steps=a.steps, guidance=a.guidance, seeds=seeds,
                                    device=a.device, batch_size=a.batch_size, progress=not a.no_progress)

    def run(line, ctx):
        settings = {m: {**v, **_settings(a).get(m, {})} for m, v in off.OFFICIAL_SETTINGS.items()}
        r = run_protocol(ctx, split_list(a.methods), targets, a.max_targets, 1, a.seed, progress=not a.no_progress,
                         on_row=line, settings=settings, baseline_max_targets=a.baseline_max_targets)
        full = styles == off.STYLE_LABELS and objects == off.OBJECTS20 and ctx.seeds == off.SEEDS and \
            a.steps == off.STEPS and a.guidance == off.GUIDANCE
        r["options"].update(paths, device=a.device, threads=a.threads, declared_subset=not full)
        return {"protocol": "official", **r}

    return _run_and_write(a, run, prepare)  # the folders it reads: refused above, each named


def _shared(p, what: str) -> None:
    p.add_argument("--methods", type=item_list, default="slug,slug-null-space,esd,salun,uce",
                   help="comma list (default slug,slug-null-space,esd,salun,uce: SLUG with the paper's step and "
                        "with the null-space step, and the three baselines)")
    p.add_argument("--targets", type=item_list, default=None,
                   help=f"comma list of styles and/or objects (default: every {what})")
    p.add_argument("--max-targets", type=COUNT, default=None, help="at most N styles and N objects")
    p.add_argument("--baseline-max-targets", type=COUNT, default=None,
                   help="the baselines on at most N of those styles and N objects (SLUG on all; default: all)")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the methods' own randomness (default 0)")
    p.add_argument("--esd-iterations", type=COUNT, default=None, help="ESD's iterations (default: the settings')")
    p.add_argument("--salun-steps", type=COUNT, default=None, help="SalUn's steps (default: the settings')")
    p.add_argument("--threads", type=THREADS, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines")


EXITS = ("A benchmark: a SLUG search that finds no step is a refused row of its table, not the run's failure. Exit "
         "status: 0 the table written, 3 written with a warning (a target the judges recognise on none of the "
         "unedited model's images), 2 a usage or input error (nothing written).")  # each --help (verification 53)


def add_parsers(sub) -> None:
    """Add ``canvas lite`` and ``canvas run`` to ``sub``."""
    c = sub.add_parser("canvas", help="UnlearnCanvas: styles and objects, SLUG beside ESD, SalUn and UCE",
                       description=f"UnlearnCanvas: styles and objects, SLUG beside ESD, SalUn and UCE. {EXITS}")
    csub = c.add_subparsers(dest="canvas_cmd", required=True)
    lite = csub.add_parser("lite", help="the UnlearnCanvas protocol on the embedded canvas (8 styles x 5 objects)",
                           description=f"The UnlearnCanvas protocol on the embedded canvas. {EXITS}")
    _shared(lite, "style and object")
    lite.add_argument("--per-pair", type=COUNT, default=2,
                      help="answer-set images per (style, object) pair (default 2: 80 images per model)")
    lite.add_argument("--sampling-steps", type=COUNT, default=20,
                      help="DDIM steps of every generated image (answer set and SLUG's validation; default 20)")
    lite.add_argument("--canvas-model", default=None,
                      help="folder written by `slug world train-canvas` (default: the shipped canvas)")
    lite.set_defaults(func=cmd_canvas)
    run = csub.add_parser("run", help="the official UnlearnCanvas protocol on your local copy (SD v1.5 fine-tuned, "
                                      "its two classifiers, its dataset)",
                          description=f"The official UnlearnCanvas protocol on your local copy. {EXITS}")
    run.add_argument("--pipeline", required=True, help="the fine-tuned SD v1.5, a diffusers folder (model_index.json)")
    run.add_argument("--clip", required=True,
                     help="the CLIP folder whose text tower is the pipeline's text encoder (openai/clip-vit-large-"
                          "patch14 saved with save_pretrained); SLUG's gradients are computed on it")
    run.add_argument("--classifiers", required=True,
                     help="folder with style50.safetensors and style50_cls.safetensors (converted from the official "
                          ".pth files: see the README) and optionally judges.json")
    run.add_argument("--data", required=True, help="the UnlearnCanvas dataset folder: DIR/{Style}/{Object}/{n}.jpg")
    _shared(run, "style (not Seed_Images) and object")
    run.add_argument("--styles", type=item_list, default=None,
                     help="a declared subset of the 51 style labels (default: all)")
    run.add_argument("--objects", type=item_list, default=None,
                     help="a declared subset of the 20 objects (default: all)")
    run.add_argument("--seeds", default=None, help="answer-set seeds (default the official 188,288,588,688,888)")
    run.add_argument("--steps", type=COUNT, default=100, help="DDIM steps of every generated image (default 100)")
    run.add_argument("--guidance", type=float, default=9.0, help="classifier-free guidance scale (default 9.0)")
    run.add_argument("--device", default="cpu", help="torch device of the pipeline and the CLIP (default cpu)")
    run.add_argument("--batch-size", type=COUNT, default=8, help="images per generation batch (default 8)")
    run.set_defaults(func=cmd_canvas_run)
