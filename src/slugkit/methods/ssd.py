"""SSD: Selective Synaptic Dampening (Foster et al., AAAI 2024), CLIP form of the SLUG repo (``unlearn/SSD.py``).

Importances (diagonal Fisher approximation) are the mean over batches of squared **batch** gradients:
imp_f from the forget loss (mean cos; the sign is irrelevant once squared) on D_f, imp_r from the CLIP contrastive
loss on D_r (the stand-in for the training data D, as in the SLUG repo; the two losses differ, as there).
For every tensor with more than one element, positions with imp_f > α·imp_r are multiplied by
β = min(1, λ·imp_r / imp_f) (exponent 1); other positions, and scalar tensors (``logit_scale``), are untouched.
No optimizer, no epochs.

* Default (``cumulative=False``): each λ in ``lambdas`` (default ``(1.0,)``, the SSD paper's λ) is applied once to
  the **pristine** weights and validated; the selection rule picks among them.
* ``cumulative=True`` reproduces the SLUG repo: λ_e = linspace(0.1, 5, 10)[e] applied to the *already dampened*
  model at every "epoch", each followed by a validation (the effects compound — a quirk of the official loop).

α = 10 (official for CLIP).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .base import Method, MethodData, MethodResult, batch_gradient_mean, forget_loss, select_epoch, snapshot


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


class SSD(Method):
    name = "ssd"
    iterative = False

    def __init__(self, alpha: float = 10.0, lambdas: tuple[float, ...] | None = None, cumulative: bool = False,
                 select_metric: str = "forget_top1", **_ignored):
        self.alpha = alpha
        self.cumulative = cumulative
        if lambdas is None:
            lambdas = tuple(float(x) for x in np.linspace(0.1, 5, 10)) if cumulative else (1.0,)
        self.lambdas = tuple(lambdas)
        super().__init__(epochs=len(self.lambdas), select_metric=select_metric, early_stop=False)

    def run(self, adapter, data: MethodData, val_eval) -> MethodResult:
        res = MethodResult(self.name, config={"method": self.name, **self.describe()})
        model = adapter.model
        t = time.perf_counter()
        imp_f = importances(adapter, data.batches("forget", 0, shuffle=False), forget_loss, res)
        imp_r = importances(adapter, data.batches("retain", 0, shuffle=False),
                            lambda a, x, y: a.retain_loss(x, y), res)
        res.timing_s["precompute"] = time.perf_counter() - t
        pristine = snapshot(model) if not self.cumulative and len(self.lambdas) > 1 else None
        states = []
        for e, lam in enumerate(self.lambdas):
            t = time.perf_counter()
            if pristine is not None and e > 0:
                model.load_state_dict(pristine)
            sel = dampen(model, imp_f, imp_r, self.alpha, lam)
            dt = time.perf_counter() - t
            res.timing_s["update"] = res.timing_s.get("update", 0.0) + dt
            m = self._validate(adapter, val_eval, res)
            res.epochs.append({"epoch": e + 1, "lambda": lam, "val": m, "update_s": dt,
                               "selected_positions": int(sum(sel.values()))})
            if len(self.lambdas) > 1:
                states.append(snapshot(model))
        idx = select_epoch(res.epochs, self.select_metric)
        res.selected_epoch = res.epochs[idx]["epoch"]
        if len(self.lambdas) > 1 and idx != len(self.lambdas) - 1:
            model.load_state_dict(states[idx])
        return res
