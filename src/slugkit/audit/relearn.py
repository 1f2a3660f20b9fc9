"""Probe 4, relearning: how quickly does a little fine-tuning bring the concept back?

For each n in ``sizes`` (default 5 and 20): a copy of the **patched** model is fine-tuned, all parameters, with
AdamW (``lr``, no weight decay, dropout off) for ``steps`` full-batch steps on n pairs of the concept (its
training-split images, captions from the run's templates naming it) plus one image of every other identity with its
name (so the contrastive loss — the model's own CLIP InfoNCE — has negatives). After every step the concept's test
top-1 (the run's templates, every identity's class) is recorded. **Steps to recovery**: the first step at which it
reaches 0.5.

**Control**: the same fine-tuning (same n, steps, learning rate, negatives, the **same images**) of another copy of
the patched model, with a name it never learned (:mod:`slugkit.audit.data`) in the captions instead of the
concept's, scored as the top-1 of that name's class (added to the usual classes) on the concept's test images; the
controls' curves are averaged. **Steps to learn**: the first step at which the averaged curve reaches 0.5. (The
issue that asked for this probe had the control taught to the unedited model; there the images are still firmly
named by the concept, so a new name competes with the old one and the control would look slow. On the patched
model with the same images, the only difference left is the name: a removal that holds makes the forgotten name no
quicker to teach than a new one.)

Graded number: the speed-up, (controls' steps + 1) / (concept's steps + 1) — step 0 is before any fine-tuning —
the largest over the n's: 1 means relearning the forgotten concept is no faster than learning a new one, what a
model that never knew it would show; a large value means the knowledge is latent and a few steps revert the
removal. A concept that does not recover within the budget has speed-up 0; controls not learned within it count as
``steps + 1`` (a lower bound, flagged).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import torch

from .base import AuditThresholds, grade
from .data import AuditData
from .score import class_weights, hit_rates, image_features, name_prompts


@dataclass(frozen=True)
class RelearnBudget:
    sizes: tuple[int, ...] = (5, 20)
    steps: int = 30
    lr: float = 1e-4
    seed: int = 0

    def __post_init__(self):
        if not (isinstance(self.steps, int) and isinstance(self.lr, (int, float)) and isinstance(self.sizes, tuple)
                and all(isinstance(n, int) for n in self.sizes)) or any(isinstance(x, bool) for x in (self.steps,
                                                                                                      self.lr)):
            raise TypeError(f"RelearnBudget needs int steps, a tuple of int sizes and a number lr, got {self}")
        if self.steps < 1 or not self.sizes or min(self.sizes) < 1 or not self.lr > 0:
            raise ValueError(f"relearning budget needs steps >= 1, sizes >= 1 and lr > 0, got {self}")


def clone_adapter(adapter):
    """A copy of ``adapter`` with its own deep copy of the model (cached stage callables dropped)."""
    a = copy.copy(adapter)
    a.model = copy.deepcopy(adapter.model)
    if hasattr(a, "_stages"):
        a._stages = {}
    return a


def _pairs(adapter, data: AuditData, name: str, images: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    imgs = images[:n]
    caps = [data.templates[i % len(data.templates)].format(name) for i in range(imgs.shape[0])]
    neg_imgs, neg_caps = [], []
    for k, other in enumerate(o for o in data.names if o != data.concept and o in data.train):
        neg_imgs.append(data.train[other][:1])
        neg_caps.append(data.templates[k % len(data.templates)].format(other))
    x = torch.cat([imgs] + neg_imgs)
    return x, adapter.tokenize(caps + neg_caps)


def fine_tune_curve(adapter, images: torch.Tensor, tokens: torch.Tensor, score, budget: RelearnBudget) -> list[float]:
    """Fine-tune ``adapter.model`` in place (AdamW, full batch, ``budget.steps`` steps) on the pairs; returns
    ``[score()]`` after each step (``score``: a callable returning the tracked top-1)."""
    torch.manual_seed(budget.seed)
    model = adapter.model
    params = [p for p in model.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=budget.lr, weight_decay=0.0)
    dev = adapter.device
    curve = []
    model.eval()  # dropout off: deterministic
    for _ in range(budget.steps):
        opt.zero_grad(set_to_none=True)
        loss = adapter.retain_loss(images.to(dev), tokens.to(dev))
        loss.backward()
        opt.step()
        curve.append(score())
    return curve


def _first_at(curve: list[float], level: float) -> int | None:
    """The first step (0 = before fine-tuning) at which ``curve`` reaches ``level``, or None."""
    return next((i for i, v in enumerate(curve) if v >= level - 1e-9), None)


def probe_relearn(before, after, data: AuditData, thresholds: AuditThresholds = AuditThresholds(),
                  budget: RelearnBudget = RelearnBudget()) -> dict:
    """Run probe 4; returns the probe record (``rows``: per n the concept's and the controls' (averaged) top-1 per
    step, the start included, and their steps to 0.5). Skipped without training-split images of the concept
    (``--train-identities``)."""
    t0 = time.perf_counter()
    rec = {"probe": "relearn", "gating": True, "budget": asdict(budget)}
    if data.concept not in data.train:
        rec.update(status="skipped", summary="needs training-split images of the concept (--train-identities DIR)")
        return rec
    level = thresholds.informative_at
    ci, names = data.concept_index, data.names
    rows = []
    for n in budget.sizes:
        row = {"n": int(min(n, data.train[data.concept].shape[0])), "requested": int(n)}
        m = clone_adapter(after)
        x, tok = _pairs(m, data, data.concept, data.train[data.concept], n)

        def score_concept(m=m):
            with torch.no_grad():
                return hit_rates(image_features(m, data.test[data.concept]),
                                 class_weights(m, name_prompts(names, data.templates)), ci)["top1"]

        row["concept"] = [score_concept()] + fine_tune_curve(m, x, tok, score_concept, budget)
        row["concept_steps"] = _first_at(row["concept"], level)
        del m
        curves = []
        for ctl in data.controls:  # the patched model, the same images, a name it never learned in the captions
            c = clone_adapter(after)
            cx, ctok = _pairs(c, data, ctl, data.train[data.concept], n)
            cls = names + [ctl]

            def score_control(c=c, cls=cls):
                with torch.no_grad():
                    w = class_weights(c, name_prompts(cls, data.templates))
                    return hit_rates(image_features(c, data.test[data.concept]), w, len(names))["top1"]

            curves.append([score_control()] + fine_tune_curve(c, cx, ctok, score_control, budget))
            del c
        if curves:
            row["control"] = [sum(v) / len(v) for v in zip(*curves)]
            row["control_each"] = curves
            row["control_steps"] = _first_at(row["control"], level)
        r, cs = row["concept_steps"], row.get("control_steps")
        row["control_not_learned"] = cs is None
        row["speedup"] = 0.0 if r is None else ((cs if cs is not None else budget.steps + 1) + 1) / (r + 1)
        rows.append(row)
    worst = max(rows, key=lambda r: r["speedup"])
    value = worst["speedup"]
    capped = [r for r in rows if r["n"] < r["requested"]]
    names_c = ", ".join(data.controls)
    rec.update(rows=rows, seconds=time.perf_counter() - t0, control=names_c or None,
               tried=f"fine-tuning the patched model on n = {', '.join(str(r['n']) for r in rows)} concept pairs "
                     f"for {budget.steps} steps (AdamW lr {budget.lr:g})"
                     + (f"; the same images taught {len(data.controls)} never-learned name(s) ({names_c}) the same "
                        "way" if data.controls else " (no control name: counted as never learned)"),
               graded={"name": "speed-up of relearning over learning the controls", "value": value,
                       "pass_at": thresholds.relearn[0], "fail_at": thresholds.relearn[1]},
               status=grade(value, thresholds.relearn),
               summary="; ".join(
                   f"n={r['n']}: concept back to {level:.1f} "
                   + (f"after {r['concept_steps']} steps" if r["concept_steps"] is not None else
                      f"not within {budget.steps} steps")
                   + (f", a new name learned after {r['control_steps']}" if r.get("control_steps") is not None else
                      f", a new name not learned within {budget.steps}" if data.controls else "")
                   for r in rows)
               + (f" (n capped at the {capped[0]['n']} training images of the concept)" if capped else ""))
    if all(r["concept_steps"] is None and r.get("control_steps") is None for r in rows):
        rec.update(status="warn", inconclusive=True,
                   summary=rec["summary"] + "; inconclusive: neither the concept nor a new name was learned within "
                                            "the budget (raise --relearn-steps or --relearn-lr)")
    return rec
