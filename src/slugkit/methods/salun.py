"""SalUn (Fan et al., ICLR 2024) for CLIP: a gradient-saliency mask plus an unlearning update on the masked weights.

**Mask.** g_f = mean over forget batches of ∇ L_forget (batch-mean cos; the SLUG repo's ``calc_grad`` forget
gradient, abs taken at the end, so gradients that cancel across batches lower the saliency), over **every**
trainable parameter (both towers, embeddings, ``logit_scale``). m = 1 on exactly ⌊f·N⌋ scalars: the top
``threshold`` fraction (default 0.5, the paper's "median") of |g_f| by one global ranking; ties are broken
deterministically by a stable sort (lower flat index first).

**Updates** (``update=``):

* ``"gaft"`` (default, registry name ``salun``): masked GA+FT, as SalUn is run in the SLUG repo
  (``unlearn_compare.py`` + ``unlearn/GAFT.py``) for its Table 1: each epoch a pass over D_f minimising mean cos,
  then a pass over D_r minimising the CLIP loss;
* ``"rl"`` (registry name ``salun-rl``): the SalUn paper's random labelling adapted to CLIP (spec §2.4-ii): each
  epoch a pass over D_f where every forget image is paired with a caption drawn at random (seeded per epoch) from
  the retain set, minimising the CLIP contrastive loss on those pairs, then a pass over D_r with the CLIP loss
  (the CIFAR-10 two-pass form of ``unlearn/RL.py``; the pass lengths play the role of β).

**Masked-out weights stay bit-identical.** Gradients are multiplied by the mask before every step, and after every
step the original values are copied back where m = 0 and AdamW's moments there are zeroed. Masking gradients alone
is not enough with AdamW: its decoupled weight decay moves every weight with wd > 0. The official code (SLUG's
CLIP SalUn, and SalUn's own classification code before PR #33, Feb 2026) only masks gradients, so its masked-out
weights decay — this implementation does not reproduce that leak.

Official (ViT-B/32): AdamW lr 1e-7, wd 0.1, batch 32, 10 epochs, cosine. Our default ``lr = 1e-4`` (10 epochs) is
tuned for the **embedded** tiny CLIP, as for GA+FT (the mask is then the only difference): validation FA@1 = 0 at
epoch 2, FA@5 = 0 at epoch 3 on the default identity. The random-labelling update does **not** reach FA@5 = 0 on
the embedded model within 10 epochs at 1e-4 or 1e-3 (at 1e-3 FA@1 dips to 0.15 while FA@5 stays 1.0): relabelling
with retain captions pushes the concept's images towards other captions, but the concept's name stays the nearest
identity name.
"""

from __future__ import annotations

import torch

from .base import GradientMethod, MethodData, MethodResult, batch_gradient_mean, forget_loss


def forget_gradient(adapter, data: MethodData, res: MethodResult | None = None) -> dict[str, torch.Tensor]:
    """Mean over forget batches (unshuffled) of ∇ of the batch-mean forget loss, for every trainable parameter."""
    return batch_gradient_mean(adapter, data.batches("forget", 0, shuffle=False), forget_loss, res, power=1)


def saliency_mask(scores: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """Bool masks with exactly ⌊fraction·N⌋ ones over all tensors: the largest scores, ties by flat index."""
    names = list(scores)
    flat = torch.cat([scores[n].detach().reshape(-1).float() for n in names])
    n_total = flat.numel()
    k = int(fraction * n_total)  # floor for fraction >= 0
    keep = torch.zeros(n_total, dtype=torch.bool)
    if k > 0:
        order = torch.argsort(flat, descending=True, stable=True)
        keep[order[:k]] = True
    out, start = {}, 0
    for n in names:
        size = scores[n].numel()
        out[n] = keep[start:start + size].reshape(scores[n].shape)
        start += size
    return out


class SalUn(GradientMethod):
    name = "salun"
    passes = ("forget", "retain")
    default_lr = 1e-4
    default_epochs = 10

    def __init__(self, lr: float | None = None, epochs: int | None = None, wd: float = 0.1,
                 threshold: float = 0.5, update: str = "gaft", select_metric: str = "forget_top1",
                 early_stop: bool = True):
        if update not in ("gaft", "rl"):
            raise ValueError(f"SalUn update must be 'gaft' or 'rl', not {update!r}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"SalUn threshold must be in [0, 1], not {threshold}")
        super().__init__(lr=lr, epochs=epochs, wd=wd, select_metric=select_metric, early_stop=early_stop)
        self.threshold = threshold
        self.update = update
        self._masks: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]] = []
        self._data: MethodData | None = None
        self.mask: dict[str, torch.Tensor] = {}

    def _prepare(self, adapter, data: MethodData, res: MethodResult) -> None:
        self._data = data
        g = forget_gradient(adapter, data, res)
        self.mask = saliency_mask({n: v.abs() for n, v in g.items()}, self.threshold)
        params = dict(adapter.model.named_parameters())
        self._masks = [(params[n], m, params[n].detach().clone()) for n, m in self.mask.items()]
        ones = sum(int(m.sum()) for m in self.mask.values())
        total = sum(m.numel() for m in self.mask.values())
        res.info["mask"] = {"ones": ones, "total": total, "fraction": ones / max(1, total),
                            "per_tensor_density": {n: float(m.float().mean()) for n, m in self.mask.items()},
                            "masked_out_restored": True}

    def _mask_grads(self, model) -> None:
        for p, m, _ in self._masks:
            if p.grad is not None:
                p.grad.mul_(m)

    @torch.no_grad()
    def _after_step(self, model, opt) -> None:
        for p, m, orig in self._masks:
            p.copy_(torch.where(m, p, orig))
            st = opt.state.get(p)
            if st:
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in st:
                        st[key].mul_(m)

    def _epoch_batches(self, data: MethodData, split: str, epoch: int):
        if split == "forget" and self.update == "rl":
            g = torch.Generator().manual_seed(data.seed * 1000 + 500 + epoch)
            idx = torch.randint(data.retain_tokens.shape[0], (data.forget_images.shape[0],), generator=g)
            return data.batches("forget", epoch, tokens=data.retain_tokens[idx])
        return data.batches(split, epoch)

    def _loss(self, adapter, split: str, images, tokens) -> torch.Tensor:
        if split == "forget" and self.update == "rl":
            return adapter.retain_loss(images, tokens)  # CLIP loss on (forget image, random retain caption)
        return super()._loss(adapter, split, images, tokens)
