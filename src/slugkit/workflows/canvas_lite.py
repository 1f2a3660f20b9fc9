"""``slug canvas lite``: the UnlearnCanvas protocol on the embedded canvas (issue 15; spec ``baselines.md`` §7).

For every target (a style or an object of :mod:`slugkit.world.canvas`) and every method, one unlearned model, then
the **answer set**: ``per_pair`` generated images of "An {object} image in {style} style." for every (style, object)
pair (DDIM 20 steps, the canvas's guidance, fixed seeds — the same for every method, so before/after are paired),
scored by the canvas's two judges:

* **UA** = 1 − the target-domain judge's accuracy on the images whose prompt names the target;
* **IRA** = the same judge's accuracy on the images of the other concepts of the target's domain;
* **CRA** = the other domain's judge's accuracy on every image of the answer set (UnlearnCanvas ``accuracy.py``
  scores the whole answer set in both domains);

and the cost of the unlearning alone: ``time_s`` (wall), ``peak_mem_bytes`` (resident-set growth, sampled;
:class:`slugkit.workflows.compare_support.PeakRSS`) and ``storage_bytes`` (the changed tensors in float32).

Methods (each its own module): **SLUG** edits one layer of the text encoder (:func:`slug_canvas`: forget pairs =
renders of the target with their prompts, retain pairs = renders of the other concepts of its domain, SLUG's
gradients, importance/alignment Pareto front on the consumed text layers, then the step searched on **generated**
validation images as SLUG's own UnlearnCanvas evaluation does (§7.5: target judged on a few images, in-domain others
on a few; seeds disjoint from the answer set)); **ESD** (:mod:`slugkit.methods.esd`, ESD-x as UnlearnCanvas runs
it, prompts "{Style} Style" / "An image of {Object}"), **SalUn** (:mod:`slugkit.methods.salun_sd`; c′ the next
concept of the domain — Imagenette's (k+1) mod N rule, as the canvas has no "Photo" style), **UCE**
(:mod:`slugkit.methods.uce`; the UnlearnCanvas port's settings: guide "", the other prompts preserved with
s_p = max(0.1, 1/|P|)). Their iteration counts and learning rates are the official ones scaled to this 1 M-parameter
UNet (:data:`BASELINE_SETTINGS`; the official values are in each module).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..world import canvas
from ..world.canvas import domain_of, target_pairs

METHODS = ("slug", "esd", "salun", "uce")
# Scaled to the 1 M-parameter canvas UNet (official: ESD 1000 it. lr 1e-5; SalUn ~600 steps lr 1e-5)
BASELINE_SETTINGS = {"esd": {"iterations": 200, "lr": 2e-4, "ddim_steps": 20, "which": "esd-x"},
                     "salun": {"steps": 100, "lr": 5e-4, "batch_size": 8, "per_pair": 3},
                     "uce": {"preserve_scale": None}}


def renders(pairs: list[tuple[str, str]], per_pair: int, seed: int) -> list[tuple[torch.Tensor, str]]:
    """``per_pair`` renders of each (style, object) with its prompt: ``[(image [3, 32, 32] in [−1, 1], prompt)]``."""
    from ..world.canvas_train import images_tensor

    x, prompts = canvas.render_pairs(pairs, per_pair, seed, 1515)
    return list(zip(images_tensor(x), prompts))


@dataclass
class AnswerSet:
    """Judge predictions on an answer set: per image its style and object (true) and the judges' predictions."""

    styles: np.ndarray
    objects: np.ndarray
    pred_style: np.ndarray
    pred_object: np.ndarray
    images: torch.Tensor | None = field(default=None, repr=False)

    def scores(self, target: str) -> dict:
        """UA / IRA / CRA of ``target`` (module docstring), fractions, and per concept the in-domain accuracy."""
        dom = domain_of(target)
        true, pred, names = ((self.styles, self.pred_style, canvas.STYLES) if dom == "style" else
                             (self.objects, self.pred_object, canvas.OBJECTS))
        o_true, o_pred = ((self.objects, self.pred_object) if dom == "style" else (self.styles, self.pred_style))
        k = names.index(target)
        per = {n: float((pred[true == i] == i).mean()) for i, n in enumerate(names) if (true == i).any()}
        if target not in per:
            raise ValueError(f"the answer set has no image of {target!r}")
        others = [v for n, v in per.items() if n != target]
        return {"ua": 1.0 - per[target], "ira": float(np.mean(others)), "cra": float((o_pred == o_true).mean()),
                "target_accuracy": per[target], "per_concept": per,
                "worst_other": min(((v, n) for n, v in per.items() if n != target))[1], "domain": dom, "k": k}


def answer_set(pipe, judges, per_pair: int, seed_base: int = 50_000, keep_images: bool = False,
               steps: int = 20) -> AnswerSet:
    """Generate (DDIM ``steps``) and judge the answer set (module docstring)."""
    S, O, ps, po, imgs = canvas.judge_plan(pipe, judges, canvas.answer_plan(per_pair, seed_base), steps)
    return AnswerSet(S, O, ps, po, imgs if keep_images else None)


def _context(canvas_dir=None):
    """The embedded CLIP (HF adapter, candidates = the text layers the canvas consumes), the canvas pipeline around
    its text tower (hash-checked), the tensor-name mapping and the judges."""
    from ..integrations.diffusers_sd import consumed_text_candidates, verify_text_encoder
    from .sd_demo import embedded_hf_adapter

    adapter = embedded_hf_adapter()
    pipe = canvas.CanvasPipeline.load(canvas_dir, clip=(adapter.model, adapter.tokenizer))
    mapping = verify_text_encoder(adapter.model, pipe.text_encoder)
    adapter.restrict_candidates(consumed_text_candidates(adapter, pipe.text_encoder),
                                consumer="text encoder of the embedded canvas")
    return adapter, pipe, mapping, canvas.CanvasJudges.load(canvas_dir)


def _next(target: str) -> str:
    names = canvas.STYLES if domain_of(target) == "style" else canvas.OBJECTS
    return names[(names.index(target) + 1) % len(names)]


def unlearn(method: str, target: str, ctx, seed: int = 0, progress: bool = False, settings: dict | None = None):
    """``(module name, DiffusionEdit)``: ``method`` run on ``target`` (module docstring); the pipeline is left as it
    was. ``settings``: per method, values replacing :data:`BASELINE_SETTINGS`' (e.g. fewer iterations in tests).
    ``ValueError`` for an unknown method."""
    from ..methods.esd import esd
    from ..methods.salun_sd import salun_sd
    from ..methods.uce import uce
    from ..world.t2i import CONTEXT_LENGTH
    from .canvas_slug import slug_canvas

    adapter, pipe, mapping, judges = ctx
    te, tok, unet = pipe.text_encoder, pipe.tokenizer, pipe.unet
    style = domain_of(target) == "style"
    others = [(s, o) for s in canvas.STYLES for o in canvas.OBJECTS if (s, o) not in target_pairs(target)]
    if method == "slug":
        return "text_encoder", slug_canvas(target, pipe, judges, adapter, mapping, seed=seed, progress=progress,
                                           **(settings or {}).get("slug", {}))
    if method == "esd":
        concept = f"{target.capitalize()} Style" if style else f"An image of {target}"
        kw = {**BASELINE_SETTINGS["esd"], **(settings or {}).get("esd", {})}
        return "unet", esd(te, tok, unet, pipe.scheduler, concept, seed=seed, max_length=CONTEXT_LENGTH,
                           progress=progress, **kw)
    if method == "salun":
        kw = {**BASELINE_SETTINGS["salun"], **(settings or {}).get("salun", {})}
        n = kw.pop("per_pair")
        pairs = target_pairs(target)
        forget = renders(pairs, n, seed + 7)
        pseudo = [canvas.prompt(o, _next(s)) if style else canvas.prompt(_next(o), s) for s, o in pairs for _ in
                  range(n)]
        retain = renders(others, 1, seed + 8)
        return "unet", salun_sd(te, tok, unet, pipe.scheduler, forget, retain, pseudo, seed=seed,
                                max_length=CONTEXT_LENGTH, progress=progress, **kw)
    if method == "uce":
        erase = [canvas.prompt(o, s) for s, o in target_pairs(target)]
        preserve = [canvas.prompt(o, s) for s, o in others]
        return "unet", uce(te, tok, unet, erase, preserve, guide="", max_length=CONTEXT_LENGTH,
                           **{**BASELINE_SETTINGS["uce"], **(settings or {}).get("uce", {})})
    raise ValueError(f"unknown canvas method {method!r}; choose from {', '.join(METHODS)}")


def choose_targets(targets: list[str] | None, max_targets: int | None) -> list[str]:
    """``targets`` checked, or every style then every object — at most ``max_targets`` of each domain."""
    if targets:
        for t in targets:
            domain_of(t)
        return list(dict.fromkeys(targets))
    k = max_targets if max_targets is not None else max(len(canvas.STYLES), len(canvas.OBJECTS))
    return canvas.STYLES[:k] + canvas.OBJECTS[:k]


def run_canvas_lite(methods=METHODS, targets: list[str] | None = None, max_targets: int | None = None,
                    per_pair: int = 2, canvas_dir=None, seed: int = 0, threads: int | None = 1,
                    progress: bool = True, on_row=None, settings: dict | None = None, steps: int = 20) -> dict:
    """Every method on every target (module docstring); returns ``{"rows", "methods", "base", "options"}``. A SLUG
    run whose search finds no step is recorded as ``refused`` (no edit: it scores as the unedited model) and the
    methods' averages count it. ``on_row(row)`` is called after each row (progress lines); ``steps``: DDIM steps of the
    answer set (20; fewer only to test the plumbing)."""
    from ..common.progress import status
    from ..methods.diffusion import applied
    from ..slug.search import SearchFailed
    from .compare_support import PeakRSS

    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown canvas method {m!r}; choose from {', '.join(METHODS)}")
    chosen = choose_targets(targets, max_targets)
    n_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        ctx = _context(canvas_dir)
        pipe, judges = ctx[1], ctx[3]
        t = time.perf_counter()
        base = answer_set(pipe, judges, per_pair, steps=steps)
        base_s = time.perf_counter() - t
        rows = []
        for target in chosen:
            for method in methods:
                status(f"{method} on {target!r}", progress)
                row = {"method": method, "target": target, "domain": domain_of(target),
                       "base": {k: v for k, v in base.scores(target).items() if k in ("ua", "ira", "cra")}}
                try:
                    with PeakRSS() as pm:
                        module, edit = unlearn(method, target, ctx, seed, progress=False, settings=settings)
                except SearchFailed as e:
                    row.update(refused=str(e), **row["base"], time_s=None, peak_mem_bytes=None, storage_bytes=0)
                else:
                    with applied(getattr(pipe, module), edit.tensors):
                        sc = answer_set(pipe, judges, per_pair, steps=steps).scores(target)
                    row.update({k: sc[k] for k in ("ua", "ira", "cra", "worst_other")}, module=module,
                               time_s=edit.time_s, peak_mem_bytes=pm.bytes, storage_bytes=edit.storage_bytes,
                               info={k: v for k, v in edit.info.items() if k not in ("log", "search")})
                rows.append(row)
                if on_row:
                    on_row(row)
    finally:
        torch.set_num_threads(n_threads)
    table = summarise(rows, methods)
    return {"rows": rows, "methods": table, "ratios": ratios(table),
            "base": {"per_pair": per_pair, "answer_set_images": len(base.styles), "generation_s": base_s,
                     "style_accuracy": float((base.pred_style == base.styles).mean()),
                     "object_accuracy": float((base.pred_object == base.objects).mean())},
            "options": {"methods": list(methods), "targets": chosen, "per_pair": per_pair, "seed": seed,
                        "sampling_steps": steps,
                        "threads": threads,
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
        timed = [r for r in mine if r.get("time_s") is not None]
        if timed:
            slow = max(timed, key=lambda r: r["time_s"])
            rec.update(time_s=float(np.mean([r["time_s"] for r in timed])),
                       slowest={"target": slow["target"], "time_s": slow["time_s"]},
                       peak_mem_bytes=max(r["peak_mem_bytes"] for r in timed),
                       storage_bytes=float(np.mean([r["storage_bytes"] for r in timed])))
        out[m] = rec
    return out


def ratios(methods: dict) -> dict:
    """Per baseline, its mean time and storage over SLUG's (the paper's 6163 : 667 : 39 s comparison); empty
    without a timed SLUG."""
    s = methods.get("slug", {})
    if not s.get("time_s"):
        return {}
    return {m: {"time": r["time_s"] / s["time_s"], "storage": r["storage_bytes"] / max(s["storage_bytes"], 1)}
            for m, r in methods.items() if m != "slug" and r.get("time_s")}


def row_line(row: dict) -> str:
    """One progress line per run: method, target, UA/IRA/CRA, time (or "refused")."""
    cost = "refused" if row.get("refused") else f"{row['time_s']:.1f} s"
    return (f"{row['method']:6s} {row['target']:9s} UA {row['ua']:.2f} IRA {row['ira']:.2f} CRA {row['cra']:.2f}  "
            f"{cost}")


__all__ = ["AnswerSet", "BASELINE_SETTINGS", "METHODS", "answer_set", "choose_targets", "domain_of", "renders",
           "ratios", "row_line", "run_canvas_lite", "summarise", "target_pairs", "unlearn"]
