"""The shared interface of the baseline unlearning methods (FT, GA, GA+FT, SalUn, SSD).

Every method gets the same :class:`MethodData` (forget and retain pairs, already preprocessed and tokenised, one batch
size, one shuffling seed) and a validation evaluator, edits ``adapter.model`` **in place**, and returns a
:class:`MethodResult` with per-epoch validation metrics, the selected epoch and its counters. The model is left at the
selected epoch's weights. ``slugkit.compare`` owns what surrounds a run (restoring the base weights, timing, memory,
storage, test metrics, MIA).

Shared settings (spec ``baselines.md`` §5.2, SLUG repo ``scripts/run_clip_comparison.sh``):

* AdamW, betas (0.9, 0.98), eps 1e-6; weight decay ``wd`` (0.1) on tensors with ndim >= 2 whose names contain none of
  ``bn``/``ln``/``bias``/``logit_scale``, 0 on the rest;
* cosine learning rate, warm-up 0, over the method's total number of optimizer steps. The step index runs over every
  step of the run (both passes of GA+FT); the official code indexes the forget pass with its own batch count
  (a harmless bug at lr 1e-7, fixed here);
* ``logit_scale`` clamped to [0, ln 100] after every step;
* per-epoch evaluation on the **validation** suite; the reported epoch is the first whose validation
  ``select_metric`` = 0, else the (first) epoch of its minimum (:func:`select_epoch`). A method's own default is
  the paper's FA@1 (``scripts/analyze_performance.py``); ``slug compare`` passes ``forget_top5`` by default — SLUG's
  own search criterion, so every method is held to the same forgetting (see ``slugkit.compare``). With
  ``early_stop`` (default) training stops at the first epoch meeting the rule, since later epochs cannot change the
  selection;
* :class:`LRSweep` (``slug compare --lr-sweep``) runs a gradient method at several learning rates and keeps the
  smallest that meets the rule; its whole search counts in the method's time.
* The model stays in ``eval()`` mode (open_clip CLIP has no dropout/batch-norm in the configs used here, and it keeps
  runs deterministic).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

LOGIT_SCALE_MAX = math.log(100.0)
# Batch size of the gradient statistics computed before any update — SalUn's saliency gradient and SSD's importances
# — as the SLUG repo's ``calc_grad`` pass runs them (``scripts/run_compute_grad.sh``: batch 16; spec baselines.md
# §2.4). SSD's squared batch gradients depend on it; the updates keep the comparison's batch size (official 32).
IMPORTANCE_BATCH_SIZE = 16
FORGET_LOSSES = ("cos", "clip")


def on_device(adapter, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch moved to the model's device (a no-op on the CPU), right before its forward."""
    return images.to(adapter.device), tokens.to(adapter.device)


@dataclass
class MethodData:
    forget_images: torch.Tensor
    forget_tokens: torch.Tensor
    retain_images: torch.Tensor
    retain_tokens: torch.Tensor
    batch_size: int = 32
    seed: int = 0

    def batches(self, split: str, epoch: int, shuffle: bool = True, tokens: torch.Tensor | None = None,
                batch_size: int | None = None):
        """The batches of ``split`` for ``epoch``: a seeded permutation (the same for every method). The tensors stay
        where the data lives (the CPU); :func:`on_device` moves a batch right before its forward."""
        imgs = self.forget_images if split == "forget" else self.retain_images
        toks = tokens if tokens is not None else (self.forget_tokens if split == "forget" else self.retain_tokens)
        n = imgs.shape[0]
        if shuffle:
            g = torch.Generator().manual_seed(self.seed * 1000 + epoch * 2 + (split == "retain"))
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        bs = batch_size or self.batch_size
        return [(imgs[order[i:i + bs]], toks[order[i:i + bs]]) for i in range(0, n, bs)]

    def n_batches(self, split: str) -> int:
        n = self.forget_images.shape[0] if split == "forget" else self.retain_images.shape[0]
        return -(-n // self.batch_size)


@dataclass
class Passes:
    """Forward/backward passes of the main network, in batches and in samples (evaluation forwards separately)."""

    forward_batches: int = 0
    backward_batches: int = 0
    forward_samples: int = 0
    backward_samples: int = 0
    eval_forward_images: int = 0
    eval_forward_texts: int = 0
    optimizer_steps: int = 0

    def train(self, n: int, backward: bool = True) -> None:
        self.forward_batches += 1
        self.forward_samples += n
        if backward:
            self.backward_batches += 1
            self.backward_samples += n

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class MethodResult:
    method: str
    epochs: list[dict] = field(default_factory=list)  # {"epoch", "val": metrics, "time_s", ...}
    selected_epoch: int | None = None
    passes: Passes = field(default_factory=Passes)
    timing_s: dict = field(default_factory=dict)  # "precompute", "update", "validation"
    config: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def select_epoch(epochs: list[dict], metric: str = "forget_top1", threshold: float = 0.0) -> int | None:
    """Index into ``epochs`` of the first entry whose ``val[metric] <= threshold``, else the first minimum.

    With ``metric="forget_top5"`` ties of the minimum are broken by ``forget_top1`` (then the earliest), so that a
    run whose FA@5 never leaves 1.0 still reports its most-forgotten epoch rather than epoch 1."""
    if not epochs:
        return None
    vals = [e["val"][metric] for e in epochs]
    for i, v in enumerate(vals):
        if v <= threshold:
            return i
    tie = [e["val"].get("forget_top1", 0.0) if metric == "forget_top5" else 0.0 for e in epochs]
    return min(range(len(vals)), key=lambda i: (vals[i], tie[i], i))


def param_groups(model: torch.nn.Module, wd: float, params: dict | None = None) -> list[dict]:
    """open_clip's ``get_default_params`` split: weight decay on ndim >= 2 tensors that are not norms/biases/scale."""
    decay, no_decay = [], []
    named = params if params is not None else dict(model.named_parameters())
    for n, p in named.items():
        if not p.requires_grad:
            continue
        excluded = p.ndim < 2 or any(s in n for s in ("bn", "ln", "bias", "logit_scale"))
        (no_decay if excluded else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": wd}]


def make_optimizer(model: torch.nn.Module, lr: float, wd: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, wd), lr=lr, betas=(0.9, 0.98), eps=1e-6)


def cosine_lr(base_lr: float, step: int, total: int, warmup: int = 0) -> float:
    """open_clip ``cosine_lr`` (warm-up then half-cosine to 0)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    e, es = step - warmup, max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * e / es)) * base_lr


def clamp_logit_scale(model: torch.nn.Module) -> None:
    ls = getattr(model, "logit_scale", None)
    if isinstance(ls, torch.Tensor):
        with torch.no_grad():
            ls.clamp_(0, LOGIT_SCALE_MAX)


def forget_loss(adapter, images, tokens) -> torch.Tensor:
    """L_forget = mean cos(image, own caption) on forget pairs; minimising it is SLUG's "gradient ascent" (−L_cos)."""
    return adapter.forget_loss_per_sample(images, tokens).mean()


def forget_loss_clip(adapter, images, tokens) -> torch.Tensor:
    """−L_clip on forget pairs: ascent on the CLIP contrastive loss (the SLUG repo's ``_o`` variants). On a batch of
    one identity the negatives are near-duplicates of the positives, which is why the repo defaults to L_cos."""
    return -adapter.retain_loss(images, tokens)


def forget_loss_fn(kind: str):
    if kind not in FORGET_LOSSES:
        raise ValueError(f"forget loss must be one of {', '.join(FORGET_LOSSES)}, not {kind!r}")
    return forget_loss if kind == "cos" else forget_loss_clip


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Method:
    """Base class. Subclasses set ``name`` and implement :meth:`run`; :meth:`describe` returns the config."""

    name = "base"
    iterative = True

    def __init__(self, epochs: int = 10, select_metric: str = "forget_top1", early_stop: bool = True):
        self.epochs = epochs
        self.select_metric = select_metric
        self.early_stop = early_stop

    def describe(self) -> dict:
        return {k: v for k, v in self.__dict__.items()
                if not k.startswith("_") and isinstance(v, (int, float, str, bool, tuple, list, type(None)))}

    def run(self, adapter, data: MethodData, val_eval) -> MethodResult:
        raise NotImplementedError

    # --- helpers shared by the iterative methods -----------------------------------------------------------
    def _validate(self, adapter, val_eval, res: MethodResult) -> dict:
        t = time.perf_counter()
        m = val_eval.evaluate_naive()
        res.passes.eval_forward_images += int(val_eval.images.shape[0])
        res.passes.eval_forward_texts += int(val_eval.tokens.shape[0])
        res.timing_s["validation"] = res.timing_s.get("validation", 0.0) + time.perf_counter() - t
        return m

    def _iterate(self, adapter, data: MethodData, val_eval, res: MethodResult, epoch_fn) -> MethodResult:
        """Run ``epoch_fn(epoch)`` for each epoch, validate, keep the selected epoch's weights, stop early."""
        model = adapter.model
        best_state, best_idx = None, None
        for epoch in range(self.epochs):
            t = time.perf_counter()
            stats = epoch_fn(epoch) or {}
            dt = time.perf_counter() - t
            res.timing_s["update"] = res.timing_s.get("update", 0.0) + dt
            m = self._validate(adapter, val_eval, res)
            res.epochs.append({"epoch": epoch + 1, "val": m, "update_s": dt, **stats})
            idx = select_epoch(res.epochs, self.select_metric)
            if idx == len(res.epochs) - 1 and idx != best_idx:
                best_idx = idx
                met = res.epochs[idx]["val"][self.select_metric] <= 0.0
                if not (met and self.early_stop):
                    best_state = snapshot(model)  # may be overtaken by a later epoch
            if self.early_stop and res.epochs[-1]["val"][self.select_metric] <= 0.0:
                break
        res.selected_epoch = res.epochs[best_idx]["epoch"] if best_idx is not None else None
        if best_idx is not None and best_idx != len(res.epochs) - 1:
            model.load_state_dict(best_state)
        return res


class GradientMethod(Method):
    """AdamW fine-tuning over a fixed sequence of passes per epoch (``passes``: "forget" and/or "retain").

    * a "forget" pass minimises L_forget = mean cos on forget pairs (ascent on L_cos, SLUG's convention;
      ``forget_loss="clip"``: −L_clip, the repo's ``_o`` variant);
    * a "retain" pass minimises the CLIP contrastive loss on retain pairs.

    Every batch takes its own optimizer step; one optimizer and one cosine schedule for the whole run.
    Subclasses may override :meth:`_loss` (random labelling) and :meth:`_after_step` (SalUn's mask).
    """

    passes: tuple[str, ...] = ()
    default_lr = 1e-5
    default_epochs = 10

    def __init__(self, lr: float | None = None, epochs: int | None = None, wd: float = 0.1,
                 select_metric: str = "forget_top1", early_stop: bool = True, forget_loss: str = "cos"):
        super().__init__(epochs=epochs or self.default_epochs, select_metric=select_metric, early_stop=early_stop)
        self.lr = self.default_lr if lr is None else lr
        self.wd = wd
        self._forget_fn = forget_loss_fn(forget_loss)
        self.forget_loss = forget_loss

    def _loss(self, adapter, split: str, images, tokens) -> torch.Tensor:
        if split == "forget":
            return self._forget_fn(adapter, images, tokens)
        return adapter.retain_loss(images, tokens)

    def _prepare(self, adapter, data: MethodData, res: MethodResult) -> None:
        """Pre-computation before the first step (SalUn's mask); counted in the method's time."""

    def _after_step(self, model, opt) -> None:
        pass

    def _epoch_batches(self, data: MethodData, split: str, epoch: int):
        return data.batches(split, epoch)

    def _n_batches(self, data: MethodData, split: str) -> int:
        """Batches per epoch of the pass ``split`` (sets the length of the cosine schedule)."""
        return data.n_batches(split)

    def run(self, adapter, data: MethodData, val_eval) -> MethodResult:
        res = MethodResult(self.name, config={"method": self.name, **self.describe(), "passes": list(self.passes)})
        model = adapter.model
        t = time.perf_counter()
        self._prepare(adapter, data, res)
        res.timing_s["precompute"] = time.perf_counter() - t
        opt = make_optimizer(model, self.lr, self.wd)
        total = self.epochs * sum(self._n_batches(data, s) for s in self.passes)
        step = [0]

        def epoch_fn(epoch: int) -> dict:
            losses = {}
            for split in self.passes:
                vals = []
                for images, tokens in self._epoch_batches(data, split, epoch):
                    lr = cosine_lr(self.lr, step[0], total)
                    for g in opt.param_groups:
                        g["lr"] = lr
                    opt.zero_grad(set_to_none=True)
                    images, tokens = on_device(adapter, images, tokens)
                    loss = self._loss(adapter, split, images, tokens)
                    loss.backward()
                    res.passes.train(int(images.shape[0]))
                    self._mask_grads(model)
                    opt.step()
                    res.passes.optimizer_steps += 1
                    clamp_logit_scale(model)
                    self._after_step(model, opt)
                    step[0] += 1
                    vals.append(float(loss.detach()))
                losses[f"{split}_loss"] = sum(vals) / max(1, len(vals))
            return losses

        return self._iterate(adapter, data, val_eval, res, epoch_fn)

    def _mask_grads(self, model) -> None:
        pass


def batch_gradient_mean(adapter, batches, loss_fn, res: MethodResult | None = None,
                        power: int = 1) -> dict[str, torch.Tensor]:
    """Mean over ``batches`` of (∇ batch loss)^power for every trainable parameter (float32): power 1 is SalUn's
    saliency gradient, power 2 SSD's diagonal-Fisher importance (the official per-batch definitions)."""
    model = adapter.model
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    nb = 0
    for images, tokens in batches:
        model.zero_grad(set_to_none=True)
        loss_fn(adapter, *on_device(adapter, images, tokens)).backward()
        if res is not None:
            res.passes.train(int(images.shape[0]))
        for n, p in params.items():
            if p.grad is not None:
                acc[n] += p.grad.float() ** power if power != 1 else p.grad.float()
        nb += 1
    model.zero_grad(set_to_none=True)
    return {n: a / max(1, nb) for n, a in acc.items()}


LR_GRID = (3e-5, 1e-4, 3e-4, 1e-3)  # ``slug compare --lr-sweep`` (half-decades around the embedded defaults)


class LRSweep(Method):
    """Learning-rate sweep around a gradient method: run ``factory(lr)`` for each ``lr`` in ascending order, every run
    from the same start weights and with early stopping, and keep the **first (smallest) lr whose selected epoch meets
    the rule** (validation ``select_metric`` = 0); later (larger) rates are not tried. If none meets it, the run whose
    selected epoch is best — (metric, FA@1, smaller lr) — is kept and its weights restored.

    The rates are tried on the validation images only. Every run's pre-computation, updates and validations are part
    of the method's time and passes: a user who must find the learning rate pays for the search (SLUG's step-size
    search is counted the same way). ``info["lr_sweep"]`` lists each run.
    """

    def __init__(self, factory, lrs=LR_GRID, select_metric: str = "forget_top1"):
        if not lrs:
            raise ValueError("LRSweep needs at least one learning rate")
        self.factory = factory
        self.lrs = tuple(sorted(float(x) for x in lrs))
        first = factory(self.lrs[0])
        self.name = first.name
        super().__init__(epochs=first.epochs, select_metric=select_metric, early_stop=True)

    def run(self, adapter, data: MethodData, val_eval) -> MethodResult:
        model = adapter.model
        start = snapshot(model) if len(self.lrs) > 1 else None
        passes, timing, runs = Passes(), {}, []
        best = None  # (key, index, state or None, result)
        for i, lr in enumerate(self.lrs):
            if i:
                model.load_state_dict(start)
            r = self.factory(lr).run(adapter, data, val_eval)
            sel = next(e for e in r.epochs if e["epoch"] == r.selected_epoch)["val"]
            met = sel[self.select_metric] <= 0.0
            runs.append({"lr": lr, "epochs_run": len(r.epochs), "selected_epoch": r.selected_epoch, "met": met,
                         "val": sel, "time_s": sum(r.timing_s.values())})
            for k, v in r.passes.as_dict().items():
                setattr(passes, k, getattr(passes, k) + v)
            for k, v in r.timing_s.items():
                timing[k] = timing.get(k, 0.0) + v
            key = (not met, sel[self.select_metric], sel.get("forget_top1", 0.0), i)
            if best is None or key < best[0]:
                best = (key, i, None if (met or i == len(self.lrs) - 1) else snapshot(model), r)
            if met:
                break
        if best[1] != len(runs) - 1:
            model.load_state_dict(best[2])
        res = best[3]
        res.passes, res.timing_s = passes, timing
        res.config = {**res.config, "lr": self.lrs[best[1]], "lr_sweep": list(self.lrs)}
        res.info["lr_sweep"] = runs
        return res
