"""The UnlearnCanvas protocol (issue 15; spec ``baselines.md`` §7) on any canvas: ``slug canvas lite`` runs it on the
embedded canvas (:func:`run_canvas_lite`), ``slug canvas run`` on the user's UnlearnCanvas
(:mod:`slugkit.workflows.canvas_official`); both are :func:`run_protocol` over a :class:`CanvasContext`.

For every target (a style or an object of the context's :class:`~slugkit.world.canvas.Grid`) and every method, one
unlearned model, then the **answer set**: generated images of the grid's prompt ("An {object} image in {Style}
style." on the embedded canvas, "A {object} image in {style} style." on UnlearnCanvas) for every (style, object) pair
(the context's sampler settings and fixed seeds — the same for every method, so before/after are paired; the
embedded canvas: ``per_pair`` seeds per pair, DDIM 20 steps), scored by the two judges:

* **UA** = 1 − the target-domain judge's accuracy on the images whose prompt names the target;
* **IRA** = the same judge's accuracy on the images of the other concepts of the target's domain;
* **CRA** = the other domain's judge's accuracy on every image of the answer set (UnlearnCanvas ``accuracy.py``
  scores the whole answer set in both domains);

and the cost of the unlearning alone: ``time_s`` (wall), ``peak_mem_bytes`` (resident-set growth, the kernel's
high-water mark: :class:`slugkit.workflows.compare_support.PeakRSS`), ``storage_bytes`` (the changed tensors in
float32) and ``storage_full_bytes`` (the checkpoint as UnlearnCanvas stores a method's result: the whole edited
UNet; SLUG's is its edited layer, float32, as the paper counts it — a slugkit patch file also keeps the original
values for a verifiable revert, 2× that).

Methods (each its own module): **SLUG** edits one layer of the text encoder (:func:`slug_canvas`: forget pairs =
renders of the target with their prompts, retain pairs = renders of the other concepts of its domain, SLUG's
gradients, importance/alignment Pareto front on the consumed text layers, then the step searched on **generated**
validation images as SLUG's own UnlearnCanvas script does (§7.5: 3 images of the target, one each of 3 other
concepts of its domain, the first accepted step; seeds disjoint from the answer set)); **ESD**
(:mod:`slugkit.methods.esd`, ESD-x as UnlearnCanvas runs it, prompts "{Style} Style" / "An image of {Object}"),
**SalUn** (:mod:`slugkit.methods.salun_sd`; c′ the next concept of the domain — Imagenette's (k+1) mod N rule, as
the canvas has no "Photo" style), **UCE** (:mod:`slugkit.methods.uce`; the UnlearnCanvas port's settings: guide "",
the prompts of :meth:`~slugkit.world.canvas.Grid.uce_prompts`, s_p = max(0.1, 1/|P|)). :data:`BASELINE_SETTINGS`:
ESD's iteration count is the CompVis code's (1,000, what UnlearnCanvas timed), its learning rate and SalUn's scaled
to the embedded 1 M-parameter UNet; the official values are in each module. ``slug canvas run`` uses
:data:`slugkit.workflows.canvas_official.OFFICIAL_SETTINGS` (SD-1.5 scale).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..world import canvas

METHODS = ("slug", "slug-null-space", "esd", "salun", "uce")
SLUG_METHODS = ("slug", "slug-null-space")  # the paper's step; issue 12's null-space variant (canvas_slug)
# ESD: the CompVis code's 1,000 iterations (the code UnlearnCanvas ran for its 6,163 s), z_t sampled with the canvas's
# 20 DDIM steps, Adam lr 4e-5 — the total displacement (iterations × lr) of 200 × 2e-4, the rate measured to erase on
# this 1 M-parameter UNet (the official 1e-5 is for SD 1.x). SalUn: 100 steps (its NSFW schedule), lr 5e-4.
BASELINE_SETTINGS = {"esd": {"iterations": 1000, "lr": 4e-5, "ddim_steps": 20, "which": "esd-x"},
                     "salun": {"steps": 100, "lr": 5e-4, "batch_size": 8, "per_pair": 3},
                     "uce": {"preserve_scale": None}}


@dataclass
class CanvasContext:
    """What a canvas run needs: the CLIP whose text tower is the generator's (``adapter``, restricted to the consumed
    text layers; ``mapping``: its tensor names → the generator's text-encoder names), the generator ``pipe``
    (``pipe(prompts, seeds, steps=, guidance=)`` → uint8 ``[N, 3, H, W]``, with ``text_encoder``, ``tokenizer``,
    ``unet``, ``scheduler``), the two ``judges`` (``predict(uint8 images)`` → style and object indices), the
    :class:`~slugkit.world.canvas.Grid`, the prompt length the generator encodes (``max_length``), the sampler
    settings of every generated image (DDIM ``steps``, ``guidance`` — None: the pipeline's), the answer set's fixed
    ``seeds`` (None: ``per_pair`` seeds per pair) and, for a latent-space UNet, ``to_latent`` (images in [−1, 1] →
    scaled VAE latents; SalUn needs it)."""

    adapter: object
    pipe: object
    mapping: dict
    judges: object
    grid: canvas.Grid
    max_length: int | None = None
    steps: int = 20
    guidance: float | None = None
    seeds: list[int] | None = None
    to_latent: object = None

    def sampling(self, steps: int | None = None) -> dict:
        """Keyword arguments of ``pipe`` for one generation (``steps`` overrides the context's)."""
        return {"steps": steps or self.steps, **({} if self.guidance is None else {"guidance": self.guidance})}


def renders(grid, pairs: list[tuple[str, str]], per_pair: int, seed: int) -> list[tuple[torch.Tensor, str]]:
    """``per_pair`` images of each (style, object) with its prompt: ``[(image [3, H, W] in [−1, 1], prompt)]``."""
    from ..world.canvas_train import images_tensor

    x, prompts = grid.images(pairs, per_pair, seed, 1515)
    return list(zip(images_tensor(x), prompts))


@dataclass
class AnswerSet:
    """Judge predictions on an answer set: per image its style and object (true) and the judges' predictions."""

    styles: np.ndarray
    objects: np.ndarray
    pred_style: np.ndarray
    pred_object: np.ndarray
    images: torch.Tensor | None = field(default=None, repr=False)

    def scores(self, target: str, grid: canvas.Grid = canvas.EMBEDDED) -> dict:
        """UA / IRA / CRA of ``target`` (module docstring), fractions, and per concept the in-domain accuracy."""
        dom = grid.domain_of(target)
        true, pred, names = ((self.styles, self.pred_style, grid.styles) if dom == "style" else
                             (self.objects, self.pred_object, grid.objects))
        o_true, o_pred = ((self.objects, self.pred_object) if dom == "style" else (self.styles, self.pred_style))
        k = names.index(target)
        per = {n: float((pred[true == i] == i).mean()) for i, n in enumerate(names) if (true == i).any()}
        if target not in per:
            raise ValueError(f"the answer set has no image of {target!r}")
        others = [v for n, v in per.items() if n != target]
        return {"ua": 1.0 - per[target], "ira": float(np.mean(others)), "cra": float((o_pred == o_true).mean()),
                "target_accuracy": per[target], "per_concept": per,
                "worst_other": min(((v, n) for n, v in per.items() if n != target))[1], "domain": dom, "k": k}


def answer_set(ctx: CanvasContext, per_pair: int, seed_base: int = 50_000, keep_images: bool = False) -> AnswerSet:
    """Generate and judge the answer set (module docstring; the context's sampler settings and seeds)."""
    plan = ctx.grid.answer_plan(per_pair, seed_base, seeds=ctx.seeds)
    S, O, ps, po, imgs = ctx.grid.judge_plan(ctx.pipe, ctx.judges, plan, **ctx.sampling())
    return AnswerSet(S, O, ps, po, imgs if keep_images else None)


def embedded_context(canvas_dir=None, steps: int = 20) -> CanvasContext:
    """The embedded CLIP (HF adapter, candidates = the text layers the canvas consumes), the canvas pipeline around
    its text tower (hash-checked), the tensor-name mapping and the judges."""
    from ..integrations.diffusers_sd import consumed_text_candidates, verify_text_encoder
    from ..world.t2i import CONTEXT_LENGTH
    from .sd_demo import embedded_hf_adapter

    adapter = embedded_hf_adapter()
    pipe = canvas.CanvasPipeline.load(canvas_dir, clip=(adapter.model, adapter.tokenizer))
    mapping = verify_text_encoder(adapter.model, pipe.text_encoder)
    adapter.restrict_candidates(consumed_text_candidates(adapter, pipe.text_encoder),
                                consumer="text encoder of the embedded canvas")
    return CanvasContext(adapter, pipe, mapping, canvas.CanvasJudges.load(canvas_dir), canvas.EMBEDDED,
                         max_length=CONTEXT_LENGTH, steps=steps)


def _next(grid, target: str) -> str:
    names = grid.names(grid.domain_of(target))
    return names[(names.index(target) + 1) % len(names)]


def unlearn(method: str, target: str, ctx, seed: int = 0, progress: bool = False, settings: dict | None = None):
    """``(module name, DiffusionEdit)``: ``method`` run on ``target`` (module docstring); the pipeline is left as it
    was. ``settings``: per method, values replacing :data:`BASELINE_SETTINGS`' (e.g. fewer iterations in tests).
    ``ValueError`` for an unknown method."""
    from ..methods.esd import esd
    from ..methods.salun_sd import salun_sd
    from ..methods.uce import uce
    from .canvas_slug import slug_canvas

    pipe, grid, L = ctx.pipe, ctx.grid, ctx.max_length
    te, tok, unet = pipe.text_encoder, pipe.tokenizer, pipe.unet
    style = grid.domain_of(target) == "style"
    pairs, others = grid.target_pairs(target), grid.other_pairs(target)
    if method in SLUG_METHODS:
        kw = {**({"step": "null-space"} if method == "slug-null-space" else {}), **(settings or {}).get(method, {})}
        return "text_encoder", slug_canvas(target, ctx, seed=seed, progress=progress, **kw)
    if method == "esd":
        concept = f"{grid.display(target)} Style" if style else f"An image of {target}"
        kw = {**BASELINE_SETTINGS["esd"], **(settings or {}).get("esd", {})}
        return "unet", esd(te, tok, unet, pipe.scheduler, concept, seed=seed, max_length=L, progress=progress, **kw)
    if method == "salun":
        kw = {**BASELINE_SETTINGS["salun"], **(settings or {}).get("salun", {})}
        n = kw.pop("per_pair")
        forget = renders(grid, pairs, n, seed + 7)
        pseudo = [grid.prompt(o, _next(grid, s)) if style else grid.prompt(_next(grid, o), s) for s, o in pairs
                  for _ in range(n)]
        retain = renders(grid, others, 1, seed + 8)
        return "unet", salun_sd(te, tok, unet, pipe.scheduler, forget, retain, pseudo, seed=seed, max_length=L,
                                to_latent=ctx.to_latent, progress=progress, **kw)
    if method == "uce":
        erase, preserve = grid.uce_prompts(target)
        return "unet", uce(te, tok, unet, erase, preserve, guide="", max_length=L,
                           **{**BASELINE_SETTINGS["uce"], **(settings or {}).get("uce", {})})
    raise ValueError(f"unknown canvas method {method!r}; choose from {', '.join(METHODS)}")


def choose_targets(targets: list[str] | None, max_targets: int | None, grid: canvas.Grid = canvas.EMBEDDED
                   ) -> list[str]:
    """``targets`` checked, or every style target then every object — at most ``max_targets`` of each domain."""
    if targets:
        for t in targets:
            grid.domain_of(t)
        return list(dict.fromkeys(targets))
    styles = [s for s in grid.styles if s not in grid.not_targets]
    k = max_targets if max_targets is not None else max(len(styles), len(grid.objects))
    return styles[:k] + grid.objects[:k]


def baseline_limit_error(methods, baseline_max_targets: int | None, flag: str = "baseline_max_targets",
                         grid=None) -> str | None:
    """Why ``baseline_max_targets`` cannot apply to ``methods`` (None when it can): it limits the baselines while
    SLUG runs on every target, so with SLUG alone it would do nothing, and without SLUG the other targets would run
    no method at all (``max_targets`` is the limit then). ``flag`` names the option in the message (a CLI flag
    such as ``--baseline-max-targets`` makes it suggest ``--max-targets N``)."""
    if baseline_max_targets is None:
        return None
    if set(methods) <= set(SLUG_METHODS):
        return f"{flag} limits the baselines; with SLUG alone among the methods it would do nothing"
    if not set(methods) & set(SLUG_METHODS):
        alt = "--max-targets " if flag.startswith("--") else "max_targets="
        why = (f"{flag} limits the baselines while SLUG runs on every target; without slug among the methods the "
               "other targets would run no method")
        if grid is not None and limit_does_nothing(choose_targets(None, None, grid), baseline_max_targets, grid):
            return why + " — and it would limit nothing here: leave it out"  # not "use --max-targets N" (trial 40)
        return why + f" — use {alt}{baseline_max_targets} instead"
    return None


def run_canvas_lite(methods=METHODS, targets: list[str] | None = None, max_targets: int | None = None,
                    per_pair: int = 2, canvas_dir=None, seed: int = 0, threads: int | None = 1,
                    progress: bool = True, on_row=None, settings: dict | None = None, steps: int = 20,
                    baseline_max_targets: int | None = None) -> dict:
    """Every method on every target of the embedded canvas (module docstring); see :func:`run_protocol`.
    ``steps``: DDIM steps of every generated image (20; fewer only to test the plumbing)."""
    n_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        report = run_protocol(embedded_context(canvas_dir, steps), methods, targets, max_targets, per_pair, seed,
                              progress, on_row, settings, baseline_max_targets)
    finally:
        torch.set_num_threads(n_threads)
    import hashlib

    d = canvas.CANVAS_DIR if canvas_dir is None else canvas_dir
    report["options"].update(threads=threads, canvas_model=str(d), canvas_unet_sha256=hashlib.sha256(
        (Path(d) / canvas.UNET_FILE).read_bytes()).hexdigest())
    return report


def limit_does_nothing(chosen: list[str], k: int | None, grid, flag: str = "baseline_max_targets") -> str | None:
    """Why a ``baseline_max_targets`` (or ``--max-targets``, with every target of the grid as ``chosen``) of ``k``
    limits nothing among the ``chosen`` targets (None when it does): it was accepted silently above --max-targets
    (eleventh trial; --max-targets 100 ran everything, twentieth)."""
    n = [sum(grid.domain_of(t) == d for t in chosen) for d in ("style", "object")]
    if k is None or k < max(n):
        return None
    def count(m, word):
        return f"{m} {word}{'' if m == 1 else 's'}"

    return (f"{flag} {k} limits nothing: the targets are {count(n[0], 'style')} and {count(n[1], 'object')}; leave it "
            "out" + (f", or give fewer than {max(n)}" if max(n) > 1 else ""))  # "give fewer than 1" (20th trial)


def run_protocol(ctx: CanvasContext, methods=METHODS, targets: list[str] | None = None,
                 max_targets: int | None = None, per_pair: int = 2, seed: int = 0, progress: bool = True,
                 on_row=None, settings: dict | None = None, baseline_max_targets: int | None = None) -> dict:
    """Every method on every target of ``ctx``'s grid: one unlearned model each, scored on the answer set; returns
    ``{"rows", "methods", "ratios", "base", "options"}``. With ``baseline_max_targets`` the baselines run on at
    most that many of the chosen styles and of the chosen objects (SLUG on all of them: the baselines cost minutes
    each). A SLUG run whose search finds no step is recorded as ``refused`` (no edit: it scores as the unedited
    model) and the methods' averages count it. ``on_row(row)`` is called after each row (progress lines).
    ``ValueError`` for an unknown method or target, or a ``baseline_max_targets`` that cannot apply
    (:func:`baseline_limit_error`)."""
    from ..common.progress import status
    from ..methods.diffusion import applied
    from ..slug.search import SearchFailed
    from .canvas_slug import row_info
    from .compare_support import PeakRSS

    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown canvas method {m!r}; choose from {', '.join(METHODS)}")
    why = baseline_limit_error(methods, baseline_max_targets)
    if why:
        raise ValueError(why)
    grid = ctx.grid
    chosen = choose_targets(targets, max_targets, grid)
    why = limit_does_nothing(chosen, baseline_max_targets, grid)
    if why:
        raise ValueError(why)
    k = baseline_max_targets
    baseline = ([t for t in chosen if grid.domain_of(t) == "style"][:k] +
                [t for t in chosen if grid.domain_of(t) == "object"][:k]) if k is not None else chosen
    t = time.perf_counter()
    base = answer_set(ctx, per_pair)
    base_s = time.perf_counter() - t
    # a target the judge never recognises on the unedited model's images has UA 100 % after any method, which says
    # nothing (20th trial: untrained or mislabelled judges, every method a "perfect" erasure); said, and marked
    unrecognised = [x for x in chosen if base.scores(x, grid)["target_accuracy"] == 0]
    rows = []
    for target in chosen:
        for method in methods:
            if method not in SLUG_METHODS and target not in baseline:
                continue
            status(f"{method} on {target!r}", progress)
            row = {"method": method, "target": target, "domain": grid.domain_of(target),
                   "base": {k: v for k, v in base.scores(target, grid).items() if k in ("ua", "ira", "cra")},
                   **({"base_unrecognised": True} if target in unrecognised else {})}
            cuda = next(ctx.pipe.unet.parameters()).is_cuda
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t_run = time.perf_counter()
            try:
                with PeakRSS() as pm:
                    module, edit = unlearn(method, target, ctx, seed, progress=progress, settings=settings)
            except SearchFailed as e:  # the search's cost is a cost of the method: its time is recorded
                spent = getattr(e, "time_s", None)  # SLUG's own clock (data in hand), else the whole call
                spent = time.perf_counter() - t_run if spent is None else spent
                row.update(refused=str(e), **row["base"], time_s=spent,
                           peak_mem_bytes=pm.bytes, peak_mem_method=pm.mode, storage_bytes=0, storage_full_bytes=0,
                           **({"info": row_info(e.record)} if getattr(e, "record", None) else {}))
            else:
                with applied(getattr(ctx.pipe, module), edit.tensors):
                    sc = answer_set(ctx, per_pair).scores(target, grid)
                full = sum(p.numel() * 4 for p in getattr(ctx.pipe, module).parameters())
                row.update({k: sc[k] for k in ("ua", "ira", "cra", "worst_other")}, module=module,
                           time_s=edit.time_s, peak_mem_bytes=pm.bytes, peak_mem_method=pm.mode,
                           storage_bytes=edit.storage_bytes,
                           **({"peak_gpu_mem_bytes": torch.cuda.max_memory_allocated()} if cuda else {}),
                           storage_full_bytes=full if module == "unet" else edit.storage_bytes,
                           info=row_info({k: v for k, v in edit.info.items() if k != "log"}))
            rows.append(row)
            if on_row:
                on_row(row)
    table = summarise(rows, methods)
    paired, slugs = table, [m for m in SLUG_METHODS if m in table]
    if slugs and set(baseline) != set(chosen):  # compare SLUG on the baselines' targets only
        paired = {**table, **summarise([r for r in rows if r["method"] in slugs and r["target"] in set(baseline)],
                                       slugs)}
    return {"rows": rows, "methods": table, "ratios": ratios(paired),
            **({"ratios_null_space": ratios(paired, "slug-null-space")} if "slug-null-space" in table else {}),
            **{f"{m.replace('-', '_')}_on_baseline_targets": paired[m] for m in slugs if paired is not table},
            "base": {"per_pair": per_pair, "answer_set_images": len(base.styles), "generation_s": base_s,
                     "style_accuracy": float((base.pred_style == base.styles).mean()),
                     "object_accuracy": float((base.pred_object == base.objects).mean()),
                     "unrecognised_targets": unrecognised},
            "options": {"methods": list(methods), "styles": grid.styles, "objects": grid.objects, "targets": chosen,
                        "baseline_targets": baseline,
                        "per_pair": per_pair, "seed": seed,
                        "sampling_steps": ctx.steps, "guidance": ctx.guidance, "answer_seeds": ctx.seeds,
                        "settings": {m: {**v, **(settings or {}).get(m, {})} for m, v in BASELINE_SETTINGS.items()}}}


def summarise(rows: list[dict], methods) -> dict:
    """Per method: style/object UA, IRA, CRA means (fractions) over its targets, the worst target by IRA, mean and
    slowest time, largest peak memory, mean storage, refusals."""
    out = {}
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        rec = {"targets": len(mine), "refused": sum(1 for r in mine if r.get("refused"))}
        for dom in ("style", "object"):
            part = [r for r in mine if r["domain"] == dom]
            if part:
                rec[dom] = {k: float(np.mean([r[k] for r in part])) for k in ("ua", "ira", "cra")}
                worst = min(part, key=lambda r: r["ira"])
                rec[dom]["worst_ira"] = {"target": worst["target"], "ira": worst["ira"]}
        timed = [r for r in mine if r.get("time_s") is not None]  # refused runs too: their search took time
        edits = [r for r in timed if not r.get("refused")]
        if timed:
            slow = max(timed, key=lambda r: r["time_s"])
            rec.update(time_s=float(np.mean([r["time_s"] for r in timed])),
                       slowest={"target": slow["target"], "time_s": slow["time_s"],
                                "refused": bool(slow.get("refused"))},
                       peak_mem_bytes=max(r["peak_mem_bytes"] for r in timed))
        if edits:
            rec.update(storage_bytes=float(np.mean([r["storage_bytes"] for r in edits])),
                       storage_full_bytes=float(np.mean([r["storage_full_bytes"] for r in edits])))
        out[m] = rec
    return out


def ratios(methods: dict, slug: str = "slug") -> dict:
    """Per baseline, over SLUG's (``slug``: which of :data:`SLUG_METHODS`): mean ``time`` (the paper's 6163 : 667 :
    39 s comparison), ``storage`` — the baseline's checkpoint as UnlearnCanvas stores it (the whole edited UNet)
    over SLUG's patch, the paper's 4.3 GB : 0.04 GB comparison — and ``storage_minimal`` (the changed tensors only,
    both sides); empty without a timed SLUG."""
    s = methods.get(slug, {})
    if not s.get("time_s") or not s.get("storage_bytes"):
        return {}
    return {m: {"time": r["time_s"] / s["time_s"],
                "storage": r.get("storage_full_bytes", r["storage_bytes"]) / max(s["storage_bytes"], 1),
                "storage_minimal": r["storage_bytes"] / max(s["storage_bytes"], 1)}
            for m, r in methods.items() if m not in SLUG_METHODS and r.get("time_s") and r.get("storage_bytes")}


def row_line(row: dict) -> str:
    """One progress line per run: method, target, UA/IRA/CRA, time (or "refused")."""
    cost = f"{row['time_s']:.1f} s" + (" (refused)" if row.get("refused") else "")
    return (f"{row['method']:15s} {row['target']:9s} UA {row['ua']:.2f} IRA {row['ira']:.2f} CRA {row['cra']:.2f}  "
            f"{cost}")


__all__ = ["AnswerSet", "BASELINE_SETTINGS", "CanvasContext", "METHODS", "SLUG_METHODS", "answer_set", "choose_targets",
           "embedded_context", "renders", "ratios", "row_line", "run_canvas_lite", "run_protocol", "summarise",
           "unlearn"]
