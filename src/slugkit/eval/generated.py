"""Scoring a text-to-image pipeline before/after a text-encoder patch: ``slug eval-sd``.

Generate images for the forgotten concept's prompts and for other concepts' prompts (fixed seeds: the same seeds
before and after), classify each zero-shot with a CLIP judge over a concept list, and report the UnlearnCanvas-style
figures (spec §6.2, baselines.md): **UA** = 1 − share of the target's images recognised as the target, **IRA** =
share of other in-domain concepts' images recognised as their concept, **CRA** = the same over a second,
cross-domain concept list (e.g. objects when unlearning a style), plus **CLIP score** (100 × cosine of image and
prompt in the judge, clipped at 0). Unlike the official evaluation it is seeded, counts every image, and names the
judge in the output.

Works on any diffusers pipeline with a CLIP ``text_encoder`` and on the embedded pipeline; the judge is any slugkit
adapter (open_clip or transformers CLIP). The embedded demo (:mod:`slugkit.sd`) uses the same metric functions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


class ZeroShotJudge:
    """Top-1 zero-shot classification of images over ``classnames`` (prompt ensembles, open_clip convention)."""

    def __init__(self, adapter, classnames: list[str], templates: list[str]):
        if not classnames:
            raise ValueError("the judge needs at least one class name")
        self.adapter, self.names, self.templates = adapter, list(classnames), list(templates)
        with torch.no_grad():
            w = [F.normalize(adapter.encode_text(adapter.tokenize([t.format(n) for t in templates])).mean(0), dim=-1)
                 for n in self.names]
        self.weights = torch.stack(w, 1)

    @torch.no_grad()
    def features(self, images: list) -> torch.Tensor:
        x = torch.stack([self.adapter.preprocess(im) for im in images])
        return self.adapter.encode_image(x)

    @torch.no_grad()
    def predict(self, images: list) -> list[str]:
        return [self.names[i] for i in (self.features(images) @ self.weights).argmax(-1).tolist()]

    @torch.no_grad()
    def clip_score(self, images: list, prompts: list[str]) -> float:
        fi = self.features(images)
        ft = self.adapter.encode_text(self.adapter.tokenize(prompts))
        return float(100.0 * (fi * ft).sum(-1).clamp_min(0).mean())


def recognised_share(pred: list[str], truth: list[str]) -> dict[str, float]:
    """Per concept: the share of its images predicted as it."""
    hits: dict[str, list[int]] = {}
    for p, t in zip(pred, truth):
        hits.setdefault(t, []).append(int(p.lower() == t.lower()))
    return {c: float(np.mean(v)) for c, v in hits.items()}


def summarise(per_concept: dict[str, float], target: str, cross: dict[str, float] | None = None,
              related=None) -> dict:
    """UA / IRA (/ CRA) and the ``generated_*`` keys of ``result.json`` from per-concept recognition.

    ``related(a, b)``: optional predicate splitting the other concepts into related / unrelated to the target."""
    others = {c: v for c, v in per_concept.items() if c != target}
    out = {"generated_target_recognised": per_concept[target],
           "generated_other_recognised": float(np.mean(list(others.values()))) if others else None,
           "UA": 1.0 - per_concept[target],
           "IRA": float(np.mean(list(others.values()))) if others else None,
           "CRA": float(np.mean(list(cross.values()))) if cross else None,
           "per_concept": per_concept}
    if related is not None:
        rel = [v for c, v in others.items() if related(c, target)]
        unrel = [v for c, v in others.items() if not related(c, target)]
        out["generated_related_recognised"] = float(np.mean(rel)) if rel else None
        out["generated_unrelated_recognised"] = float(np.mean(unrel)) if unrel else None
    if cross:
        out["per_cross_concept"] = cross
    return out


# ----------------------------------------------------------------------------------------------------------------
# Worst-case collateral: per-concept damage, the worst concept, the target's nearest neighbours (issue 12)
# ----------------------------------------------------------------------------------------------------------------

DEFAULT_N_NEIGHBOUR = 20  # images per nearest neighbour: one image moves its recognition by <= 0.05


@torch.no_grad()
def text_class_embeddings(text_encoder, tokenize, names: list[str], prompts_of, projection=None) -> torch.Tensor:
    """C x D class embeddings from a CLIP text tower: each concept's prompts (``prompts_of(name) -> [str]``,
    ``tokenize(prompts) -> input_ids``) encoded to the tower's **pooled** features (``text_embeds`` when the encoder
    projects itself, e.g. ``CLIPTextModelWithProjection``; else ``pooler_output`` — the end-of-text token's state —
    passed through ``projection``, e.g. a ``CLIPModel``'s ``text_projection``, when given), L2-normalised, averaged
    over the prompts and renormalised (the zero-shot classifier's recipe). Row i belongs to ``names[i]``.
    Raises ``ValueError`` for a concept without prompts."""
    rows = []
    dev = next(text_encoder.parameters()).device
    for n in names:
        prompts = list(prompts_of(n))
        if not prompts:
            raise ValueError(f"no prompts for concept {n!r}")
        out = text_encoder(input_ids=tokenize(prompts).to(dev))
        f = out.text_embeds if getattr(out, "text_embeds", None) is not None else out.pooler_output
        if projection is not None and getattr(out, "text_embeds", None) is None:
            f = projection(f)
        rows.append(F.normalize(F.normalize(f.float(), dim=-1).mean(0), dim=-1).cpu())
    return torch.stack(rows)


def pipeline_tokenize(pipe):
    """``prompts -> input_ids`` as ``pipe`` tokenizes its prompts: the pipeline's own ``tokenize`` when it has one (the
    embedded pipeline: 20 positions), else its tokenizer padded to ``model_max_length`` (diffusers' SD pipelines)."""
    if hasattr(pipe, "tokenize"):
        return pipe.tokenize
    tok = pipe.tokenizer
    return lambda ps: tok(list(ps), padding="max_length", max_length=tok.model_max_length, truncation=True,
                          return_tensors="pt")["input_ids"]


def target_neighbours(pipe, target: str, concepts: list[str], prompts_of, k: int, projection=None) -> list:
    """The ``k`` concepts nearest ``target`` by the cosine similarity of the **pipeline's own text encoder**'s class
    embeddings (:func:`text_class_embeddings`): ``[(name, cosine), ...]``, most similar first
    (:func:`slugkit.eval.collateral.nearest_concepts`). ``concepts`` may include the target (it is never returned)."""
    from .collateral import nearest_concepts

    names = list(dict.fromkeys([target] + [c for c in concepts if c.lower() != target.lower()]))
    emb = text_class_embeddings(pipe.text_encoder, pipeline_tokenize(pipe), names, prompts_of, projection)
    return nearest_concepts(emb, names, [0], k)


def collateral_of(before: dict, after: dict, target: str, neighbours: list, k: int, similarity: str) -> dict:
    """:func:`slugkit.eval.collateral.collateral_record` of the *other* concepts' recognition (``per_concept`` of the
    before/after metrics, target left out; fractions): per concept, worst, the nearest neighbours' rows."""
    from .collateral import collateral_record

    others = [c for c in before["per_concept"] if c.lower() != target.lower()]
    return collateral_record({c: before["per_concept"][c] for c in others},
                             {c: after["per_concept"][c] for c in others}, neighbours,
                             metric="share of generated images the judge recognises as their concept", k=k,
                             similarity=similarity)


@dataclass
class GenerationPlan:
    """Which images to generate: (concept, prompt, seed) triples, in-domain and cross-domain."""

    target: str
    items: list[tuple[str, str, int]]
    cross: list[tuple[str, str, int]] = field(default_factory=list)

    @classmethod
    def build(cls, target: str, concepts: list[str], template: str, n_target: int, n_other: int,
              cross_concepts: list[str] = (), cross_template: str | None = None, seed: int = 0) -> "GenerationPlan":
        concepts = list({c.lower(): c for c in concepts}.values())  # repeats ignored
        if target.lower() not in [c.lower() for c in concepts]:
            concepts = [target] + concepts
        items, cross = [], []
        for k, c in enumerate(concepts):
            n = n_target if c.lower() == target.lower() else n_other
            items += [(c, template.format(c), seed * 1_000_003 + 1000 * k + i) for i in range(n)]
        for k, c in enumerate(cross_concepts):
            cross.append((c, (cross_template or template).format(c), seed * 1_000_003 + 500_000 + k))
        return cls(target, items, cross)

    def topped_up(self, concepts: list[str], n: int) -> "GenerationPlan":
        """The plan with at least ``n`` images of each of ``concepts`` (the nearest neighbours): missing images are
        added after the concept's own, same prompt, seeds continuing the concept's (``first seed + i``, as
        :meth:`build` numbers them), so the images already planned are kept. Raises ``ValueError`` for a concept
        the plan does not hold."""
        if n > 1000:
            raise ValueError(f"at most 1000 images per concept (seeds are numbered 1000 apart), not {n}")
        want = {c.lower() for c in concepts}
        held = {c.lower() for c, _, _ in self.items}
        if want - held:
            raise ValueError(f"concept(s) not in the generation plan: {sorted(want - held)}")
        out: list[tuple[str, str, int]] = []
        order = list(dict.fromkeys(c for c, _, _ in self.items))
        for c in order:
            own = [it for it in self.items if it[0] == c]
            out += own
            if c.lower() in want and len(own) < n:
                out += [(c, own[0][1], own[0][2] + i) for i in range(len(own), n)]
        return GenerationPlan(self.target, out, list(self.cross))


def generate(pipe, triples, steps: int, guidance: float | None, batch_size: int = 8, progress: bool = False,
             desc: str = "generating") -> list:
    from tqdm.auto import tqdm

    from ..data.generate import pipeline_images

    out = []
    for lo in tqdm(range(0, len(triples), batch_size), desc=desc, disable=not progress):
        chunk = triples[lo:lo + batch_size]
        out += pipeline_images(pipe, [p for _, p, _ in chunk], [s for _, _, s in chunk], steps, guidance)
    return out


def evaluate_pipeline(pipe, judge: ZeroShotJudge, plan: GenerationPlan, cross_judge: ZeroShotJudge | None = None,
                      steps: int = 25, guidance: float | None = None, progress: bool = False) -> tuple[dict, list]:
    """Generate the plan's images with ``pipe`` as it is now and score them; returns (metrics, in-domain images)."""
    imgs = generate(pipe, plan.items, steps, guidance, progress=progress)
    per = recognised_share(judge.predict(imgs), [c for c, _, _ in plan.items])
    cross = None
    if plan.cross:
        if cross_judge is None:
            raise ValueError("cross-domain concepts need a cross-domain judge (their own class list)")
        cimgs = generate(pipe, plan.cross, steps, guidance, progress=progress, desc="generating (cross-domain)")
        cross = recognised_share(cross_judge.predict(cimgs), [c for c, _, _ in plan.cross])
    m = summarise(per, plan.target, cross)
    m["clip_score"] = judge.clip_score(imgs, [p for _, p, _ in plan.items])
    return m, imgs


def before_after(pipe, patch, judge: ZeroShotJudge, plan: GenerationPlan, out_dir: str | Path, *,
                 cross_judge: ZeroShotJudge | None = None, steps: int = 25, guidance: float | None = None,
                 progress: bool = True, neighbours_k: int | None = None,
                 n_neighbour: int = DEFAULT_N_NEIGHBOUR, meta: dict | None = None) -> dict:
    """Score ``pipe`` unpatched, apply ``patch`` to its text encoder in place, score again, revert (bit-exact).
    Writes ``gen_eval.json`` and ``generations.png`` (before | after per concept shown) into ``out_dir``.

    Worst-case collateral (``collateral``, :func:`collateral_of`): the ``neighbours_k`` (default
    :data:`slugkit.eval.collateral.NEIGHBOURS_K`) concepts nearest the target by the unpatched text encoder's pooled
    features of their plan prompts get at least ``n_neighbour`` images each (default 20; the plan is topped up,
    :meth:`GenerationPlan.topped_up`), the other concepts keep the plan's count. ``meta``: what was evaluated
    (``slug eval-sd``: the pipeline, the patches' paths and fingerprints, the template, the seed), recorded first in
    ``gen_eval.json`` (it recorded none: two patches composed looked like one)."""
    from ..common.files import atomic_write_bytes
    from ..data.generate import default_guidance
    from ..integrations.diffusers_sd import apply_patch_to_pipeline, revert_patch_from_pipeline
    from .collateral import NEIGHBOURS_K

    out = Path(out_dir)  # created by the first write: a patch refused below left an empty folder (16th trial)
    apply_patch_to_pipeline(pipe, patch)  # a patch the pipeline cannot take is refused before any generation
    revert_patch_from_pipeline(pipe, patch)  # (bit-exact)
    k = NEIGHBOURS_K if neighbours_k is None else neighbours_k
    prompts: dict[str, list[str]] = {}
    for c, p, _ in plan.items:
        if p not in prompts.setdefault(c, []):
            prompts[c].append(p)
    neighbours = target_neighbours(pipe, plan.target, list(prompts), prompts.__getitem__, k)
    plan = plan.topped_up([c for c, _ in neighbours], n_neighbour)
    before, imgs_b = evaluate_pipeline(pipe, judge, plan, cross_judge, steps, guidance, progress)
    apply_patch_to_pipeline(pipe, patch)
    try:
        after, imgs_a = evaluate_pipeline(pipe, judge, plan, cross_judge, steps, guidance, progress)
    finally:
        revert_patch_from_pipeline(pipe, patch)
    result = {**(meta or {}), "target": plan.target,
              "judge": {"model": judge.adapter.model_id, "classes": len(judge.names), "templates": judge.templates},
              "images": {"in_domain": len(plan.items), "cross_domain": len(plan.cross), "steps": steps,
                         "guidance": guidance if guidance is not None else default_guidance(pipe)},
              "before": before, "after": after,
              "collateral": collateral_of(before, after, plan.target, neighbours, k,
                                          "cosine of the pipeline text encoder's pooled features of the plan's "
                                          "prompts")}
    result["images"]["per_neighbour"] = min((sum(c == n for c, _, _ in plan.items) for n, _ in neighbours),
                                            default=n_neighbour)  # what they got: --n-other when that is more
    rows = []
    shown = [plan.target] + [c for c in dict.fromkeys(c for c, _, _ in plan.items) if c != plan.target][:5]
    for c in shown:
        idx = [i for i, (cc, _, _) in enumerate(plan.items) if cc == c][:8]
        rows.append((c, [imgs_b[i] for i in idx], [imgs_a[i] for i in idx]))
    image_grid(rows, out / "generations.png")
    atomic_write_bytes(out / "gen_eval.json", (json.dumps(result, indent=2) + "\n").encode())
    return result


def image_grid(rows: list[tuple[str, list, list]], path: str | Path, cell: int = 96) -> None:
    """PNG: per concept a row of "before" images, a gap, the same seeds "after"; the concept named on the left."""
    import io

    from PIL import Image, ImageDraw

    from ..common.files import atomic_write_bytes

    n = max(len(b) for _, b, _ in rows)
    label_w, gap, pad = 150, 16, 2
    W = label_w + 2 * n * (cell + pad) + gap
    H = 18 + len(rows) * (cell + pad)
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    d.text((label_w, 2), "before", fill=(0, 0, 0))
    d.text((label_w + n * (cell + pad) + gap, 2), "after (patched text encoder, same seeds)", fill=(0, 0, 0))
    for r, (label, before, after) in enumerate(rows):
        y = 18 + r * (cell + pad)
        d.text((4, y + cell // 2 - 6), label[:24], fill=(0, 0, 0))
        for j, imgs in enumerate((before, after)):
            x0 = label_w + j * (n * (cell + pad) + gap)
            for k, im in enumerate(imgs):
                canvas.paste(im.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST),
                             (x0 + k * (cell + pad), y))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
