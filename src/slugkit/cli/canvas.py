"""``slug canvas lite``: UnlearnCanvas on the embedded canvas (:mod:`slugkit.workflows.canvas_lite`).

    slug canvas lite [--methods slug,esd,salun,uce] [--targets A,B | --max-targets N] [--per-pair 2] --out DIR

Writes ``canvas.json`` (every run and the per-method table; ``time_s``, ``peak_mem_bytes``, ``storage_bytes`` per
method), ``canvas.md`` and ``canvas.png`` into ``--out`` at once (a temporary folder renamed into place). Exit
status 0, or 2 for a usage or input error.
"""

from __future__ import annotations

from .args import COUNT, THREADS, refuse, split_list


def cmd_canvas(a) -> int:
    from ..common.files import atomic_write_bytes, write_json
    from ..common.runfolder import run_folder
    from ..report.canvas import canvas_plot, render_canvas
    from ..world import canvas
    from ..workflows.canvas_lite import METHODS, row_line, run_canvas_lite

    methods = split_list(a.methods)
    bad = [m for m in methods if m not in METHODS]
    if not methods or bad:
        return refuse(f"--methods: unknown {bad[0] if bad else a.methods!r}; choose from {', '.join(METHODS)}")
    targets = split_list(a.targets) if a.targets else None
    if targets:
        unknown = [t for t in targets if t not in canvas.STYLES + canvas.OBJECTS]
        if unknown:
            return refuse(f"--targets: unknown {unknown[0]!r}; styles: {', '.join(canvas.STYLES)}; objects: "
                          f"{', '.join(canvas.OBJECTS)}")
    if targets and a.max_targets is not None:
        return refuse("--targets and --max-targets exclude each other")

    from ..common.outlock import claim_out

    claim_out(a.out, a.overwrite, "canvas.json")  # an existing run is refused now, not after hours of work

    def line(row):
        if not a.no_progress:
            print(row_line(row), flush=True)

    report = run_canvas_lite(methods, targets, a.max_targets, a.per_pair, a.canvas_model, a.seed, a.threads,
                             progress=not a.no_progress, on_row=line, steps=a.sampling_steps,
                             settings={"slug": {"sampling_steps": a.sampling_steps}})
    with run_folder(a.out, a.overwrite, marker="canvas.json") as stage:
        write_json(stage / "canvas.json", report)
        atomic_write_bytes(stage / "canvas.md", render_canvas(report).encode())
        canvas_plot(report, stage / "canvas.png")
    print(f"wrote {a.out}/canvas.json, canvas.md, canvas.png")
    return 0


def add_parsers(sub) -> None:
    """Add ``canvas lite`` to ``sub``."""
    c = sub.add_parser("canvas", help="UnlearnCanvas: styles and objects, SLUG beside ESD, SalUn and UCE")
    csub = c.add_subparsers(dest="canvas_cmd", required=True)
    lite = csub.add_parser("lite", help="the UnlearnCanvas protocol on the embedded canvas (8 styles x 8 objects)")
    lite.add_argument("--methods", default="slug,esd,salun,uce", help="comma list (default slug,esd,salun,uce)")
    lite.add_argument("--targets", default=None, help="comma list of styles and/or objects (default: every one)")
    lite.add_argument("--max-targets", type=COUNT, default=None, help="at most N styles and N objects")
    lite.add_argument("--per-pair", type=COUNT, default=2,
                      help="answer-set images per (style, object) pair (default 2: 128 images per model)")
    lite.add_argument("--sampling-steps", type=COUNT, default=20,
                      help="DDIM steps of every generated image (answer set and SLUG's validation; default 20)")
    lite.add_argument("--canvas-model", default=None,
                      help="folder written by `slug world train-canvas` (needed: no canvas is shipped yet)")
    lite.add_argument("--out", required=True, help="folder to write")
    lite.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    lite.add_argument("--seed", type=int, default=0, help="seed of the methods' own randomness (default 0)")
    lite.add_argument("--threads", type=THREADS, default=1, help="torch CPU threads (default 1)")
    lite.add_argument("--no-progress", action="store_true", help="no progress lines")
    c.set_defaults(func=cmd_canvas)
