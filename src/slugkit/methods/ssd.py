"""SSD: Selective Synaptic Dampening (Foster et al., AAAI 2024), CLIP form of the SLUG repo (``unlearn/SSD.py``).

Importances (diagonal Fisher approximation) are the mean over batches of squared **batch** gradients:
imp_f from the forget loss (mean cos; the sign is irrelevant once squared) on D_f, imp_r from the CLIP contrastive
loss on D_r (the stand-in for the training data D, as in the SLUG repo; the two losses differ, as there).
For every tensor with more than one element, positions with imp_f > α·imp_r are multiplied by
β = min(1, λ·imp_r / imp_f) (exponent 1); other positions, and scalar tensors (``logit_scale``), are untouched.
No optimizer, no epochs.

* Default (``cumulative=False``): each λ in ``lambdas`` (default ``(1.0,)``, the SSD paper's λ) is applied once to
  the **pristine** weights and validated; the selection rule picks among them.
* ``alphas=(...)``: a grid, α in the given order (outer), λ in ``lambdas`` (inner), every point applied to the
  pristine weights and validated, stopping at the first point that meets the selection rule (validation metric = 0;
  later points cannot change the selection). ``slug compare`` uses :data:`ALPHA_GRID` × :data:`LAMBDA_GRID` unless
  ``--ssd-alpha`` fixes α: on the embedded model the official α = 10 selects almost nothing on the default identity,
  and with the importances at batch 16 no point with α = 10 or 5 reaches validation FA@5 = 0; the first that does is
  α = 2, λ = 0.2 (the 11th; test FA@5 0, utility 99.33 %, related 97.83 %). On the next two identities α = 10, λ = 1
  already does. The grid's validations count in SSD's time.
* ``cumulative=True`` reproduces the SLUG repo: λ_e = linspace(0.1, 5, 10)[e] applied to the *already dampened*
  model at every "epoch", each followed by a validation (the effects compound — a quirk of the official loop).

α = 10 (official for CLIP) when no grid is given.

Both importances are computed with batch ``importance_batch_size`` (16, the SLUG repo's ``calc_grad`` pass; squared
batch gradients depend on the batch size). ``importance_loss`` (spec baselines.md §4.2): ``"split"`` (default, the
SLUG repo: mean cos on D_f, CLIP loss on D_r — two losses on different scales, so α changes meaning), ``"clip"`` (the
CLIP loss on both) or ``"cos"`` (mean cos on both).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .base import (IMPORTANCE_BATCH_SIZE, Method, MethodData, MethodResult, batch_gradient_mean, forget_loss,
                   select_epoch, snapshot)

IMPORTANCE_LOSSES = ("split", "clip", "cos")


def _clip_loss(adapter, images, tokens) -> torch.Tensor:
    return adapter.retain_loss(images, tokens)


def importances(adapter, batches, loss_fn, res: MethodResult | None = None) -> dict[str, torch.Tensor]:
    """Mean over ``batches`` of the squared batch gradient of ``loss_fn(adapter, images, tokens)``."""
    return batch_gradient_mean(adapter, batches, loss_fn, res, power=2)


@torch.no_grad()
def dampen(model: torch.nn.Module, imp_f: dict, imp_r: dict, alpha: float = 10.0, lam: float = 1.0) -> dict:
    """θ ← β·θ where imp_f > α·imp_r, β = min(1, λ·imp_r/imp_f); returns {name: number of positions selected}."""
    params = dict(model.named_parameters())
    selected = {}
    for n, f in imp_f.items():
        p = params[n]
        if p.numel() <= 1:
            continue
        r = imp_r[n]
        sel = f > alpha * r
        k = int(sel.sum())
        if k == 0:
            continue
        beta = torch.clamp(lam * r / f.clamp_min(torch.finfo(f.dtype).tiny), max=1.0)
        p.copy_(torch.where(sel, p * beta.to(p.dtype), p))
        selected[n] = k
    return selected


ALPHA_GRID = (10.0, 5.0, 2.0, 1.0)  # official α first, then more positions selected
LAMBDA_GRID = (1.0, 0.5, 0.2, 0.1)  # the paper's λ first, then stronger dampening


class SSD(Method):
    name = "ssd"
    iterative = False

    def __init__(self, alpha: float = 10.0, lambdas: tuple[float, ...] | None = None, cumulative: bool = False,
                 alphas: tuple[float, ...] | None = None, select_metric: str = "forget_top1",
                 importance_loss: str = "split", importance_batch_size: int = IMPORTANCE_BATCH_SIZE, **_ignored):
        if alphas is not None and cumulative:
            raise ValueError("SSD: an α grid is not combined with the cumulative (official) sweep")
        if importance_loss not in IMPORTANCE_LOSSES:
            raise ValueError(f"SSD importance loss must be one of {', '.join(IMPORTANCE_LOSSES)}, "
                             f"not {importance_loss!r}")
        if importance_batch_size < 1:
            raise ValueError(f"importance batch size must be >= 1, not {importance_batch_size}")
        self.importance_loss = importance_loss
        self.importance_batch_size = importance_batch_size
        self.alpha = alpha
        self.alphas = tuple(float(a) for a in alphas) if alphas is not None else None
        self.cumulative = cumulative
        if lambdas is None:
            lambdas = tuple(float(x) for x in np.linspace(0.1, 5, 10)) if cumulative else \
                (LAMBDA_GRID if alphas is not None else (1.0,))
        self.lambdas = tuple(lambdas)
        self.points = [(a, lam) for a in self.alphas for lam in self.lambdas] if self.alphas is not None else \
            [(alpha, lam) for lam in self.lambdas]
        super().__init__(epochs=len(self.points), select_metric=select_metric, early_stop=self.alphas is not None)

    def run(self, adapter, data: MethodData, val_eval) -> MethodResult:
        res = MethodResult(self.name, config={"method": self.name, **self.describe()})
        model = adapter.model
        t = time.perf_counter()
        f_loss = _clip_loss if self.importance_loss == "clip" else forget_loss
        r_loss = forget_loss if self.importance_loss == "cos" else _clip_loss
        bs = self.importance_batch_size
        imp_f = importances(adapter, data.batches("forget", 0, shuffle=False, batch_size=bs), f_loss, res)
        imp_r = importances(adapter, data.batches("retain", 0, shuffle=False, batch_size=bs), r_loss, res)
        res.timing_s["precompute"] = time.perf_counter() - t
        several = len(self.points) > 1
        pristine = snapshot(model) if not self.cumulative and several else None
        best_idx, best_state = None, None
        for e, (alpha, lam) in enumerate(self.points):
            t = time.perf_counter()
            if pristine is not None and e > 0:
                model.load_state_dict(pristine)
            sel = dampen(model, imp_f, imp_r, alpha, lam)
            dt = time.perf_counter() - t
            res.timing_s["update"] = res.timing_s.get("update", 0.0) + dt
            m = self._validate(adapter, val_eval, res)
            res.epochs.append({"epoch": e + 1, "alpha": alpha, "lambda": lam, "val": m, "update_s": dt,
                               "selected_positions": int(sum(sel.values()))})
            idx = select_epoch(res.epochs, self.select_metric)
            if idx == e and idx != best_idx:
                best_idx = idx
                best_state = snapshot(model) if several else None
            if self.early_stop and m[self.select_metric] <= 0.0:
                break
        res.selected_epoch = res.epochs[best_idx]["epoch"]
        if best_idx != len(res.epochs) - 1:
            model.load_state_dict(best_state)
        return res
