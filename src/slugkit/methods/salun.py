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
* ``"rl"`` (registry name ``salun-rl``): the SalUn paper's random labelling adapted to CLIP (spec §2.4-ii): every
  epoch each forget image is paired with a caption drawn at random (seeded per epoch) from the retain set, and the
  CLIP contrastive loss is minimised on **mixed batches** of these relabelled pairs and retain pairs
  (``rl_batches="mixed"``, the default). ``rl_forget_fraction=None``: one shuffled pass over their union (the
  CIFAR-100 form of ``unlearn/RL.py``, the natural ratio N_f / (N_f + N_r)); a number f: batches of ⌊f·B⌉
  relabelled and B − ⌊f·B⌉ retain pairs until every relabelled pair has been used once (retain pairs in a seeded
  order, cycling). ``rl_batches="two-pass"``: a relabelled pass, then a retain pass (the CIFAR-10 form; the pass
  lengths play the role of β). A random caption can also sit in the same batch with its own image; the contrastive
  loss then has a duplicate caption, as the official classification code's random labels can hit the true class.

The saliency gradient is computed with batch ``importance_batch_size`` (16, the ``calc_grad`` pass of the SLUG
repo); the updates use the comparison's batch size (32). With ``forget_loss="clip"`` the saliency and the forget pass
use −L_clip (the repo's ``_o`` variant) instead of mean cos.

**Masked-out weights stay bit-identical.** Gradients are multiplied by the mask before every step, and after every
step the original values are copied back where m = 0 and AdamW's moments there are zeroed. Masking gradients alone
is not enough with AdamW: its decoupled weight decay moves every weight with wd > 0. The official code (SLUG's
CLIP SalUn, and SalUn's own classification code before PR #33, Feb 2026) only masks gradients, so its masked-out
weights decay — this implementation does not reproduce that leak.

Official (ViT-B/32): AdamW lr 1e-7, wd 0.1, batch 32, 10 epochs, cosine. Our default ``lr = 1e-4`` (10 epochs) is
tuned for the **embedded** tiny CLIP, as for GA+FT (the mask is then the only difference): validation FA@1 = 0 at
epoch 2, FA@5 = 0 at epoch 3 on the default identity. The random-labelling update does **not** reach FA@5 = 0 on
the embedded model within 10 epochs at 1e-4 or 1e-3 (mixed batches, default identity: at 1e-4 validation FA@1 stays
1.0; at 1e-3 it dips to 0.40 after one epoch, with FA@5 0.90 and utility 0.77, and climbs back; the two-pass form
behaved alike): relabelling with retain captions pushes the concept's images towards other captions, but the
concept's name stays the nearest identity name.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from .base import IMPORTANCE_BATCH_SIZE, GradientMethod, MethodData, MethodResult, batch_gradient_mean, forget_loss

RL_BATCHES = ("mixed", "two-pass")


def forget_gradient(adapter, data: MethodData, res: MethodResult | None = None,
                    batch_size: int = IMPORTANCE_BATCH_SIZE, loss_fn=forget_loss) -> dict[str, torch.Tensor]:
    """Mean over forget batches (unshuffled, ``batch_size``) of ∇ of the batch-mean forget loss, for every trainable
    parameter."""
    return batch_gradient_mean(adapter, data.batches("forget", 0, shuffle=False, batch_size=batch_size), loss_fn, res,
                               power=1)


def mask_size(fraction: float, n_total: int) -> int:
    """⌊fraction·N⌋ computed exactly from the decimal ``fraction`` (``int(0.29 * 100)`` would give 28)."""
    return math.floor(Fraction(str(fraction)) * n_total)


def saliency_mask(scores: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """Bool masks with exactly ⌊fraction·N⌋ ones over all tensors: the largest scores, ties by flat index. The
    masks live on the scores' device."""
    names = list(scores)
    flat = torch.cat([scores[n].detach().reshape(-1).float() for n in names])
    n_total = flat.numel()
    k = mask_size(fraction, n_total)
    keep = torch.zeros(n_total, dtype=torch.bool, device=flat.device)
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
                 early_stop: bool = True, forget_loss: str = "cos", rl_batches: str = "mixed",
                 rl_forget_fraction: float | None = None, importance_batch_size: int = IMPORTANCE_BATCH_SIZE):
        if update not in ("gaft", "rl"):
            raise ValueError(f"SalUn update must be 'gaft' or 'rl', not {update!r}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"SalUn threshold must be in [0, 1], not {threshold}")
        if rl_batches not in RL_BATCHES:
            raise ValueError(f"SalUn rl_batches must be one of {', '.join(RL_BATCHES)}, not {rl_batches!r}")
        if rl_forget_fraction is not None and not 0.0 < rl_forget_fraction <= 1.0:
            raise ValueError(f"SalUn-RL forget fraction must be in (0, 1], not {rl_forget_fraction}")
        if importance_batch_size < 1:
            raise ValueError(f"importance batch size must be >= 1, not {importance_batch_size}")
        super().__init__(lr=lr, epochs=epochs, wd=wd, select_metric=select_metric, early_stop=early_stop,
                         forget_loss=forget_loss)
        self.threshold = threshold
        self.update = update
        self.rl_batches = rl_batches if update == "rl" else None
        self.rl_forget_fraction = rl_forget_fraction if update == "rl" else None
        self.importance_batch_size = importance_batch_size
        if update == "rl" and rl_batches == "mixed":
            self.passes = ("mixed",)
        self._masks: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]] = []
        self._data: MethodData | None = None
        self.mask: dict[str, torch.Tensor] = {}

    def _prepare(self, adapter, data: MethodData, res: MethodResult) -> None:
        self._data = data
        g = forget_gradient(adapter, data, res, self.importance_batch_size, self._forget_fn)
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

    @staticmethod
    def _random_captions(data: MethodData, epoch: int) -> torch.Tensor:
        """For each forget image, the tokens of a retain caption drawn at random (seeded per epoch)."""
        g = torch.Generator().manual_seed(data.seed * 1000 + 500 + epoch)
        idx = torch.randint(data.retain_tokens.shape[0], (data.forget_images.shape[0],), generator=g)
        return data.retain_tokens[idx]

    def _mixed_batches(self, data: MethodData, epoch: int) -> list:
        f_img, f_tok = data.forget_images, self._random_captions(data, epoch)
        r_img, r_tok = data.retain_images, data.retain_tokens
        nf, nr, bs = f_img.shape[0], r_img.shape[0], data.batch_size
        g = torch.Generator().manual_seed(data.seed * 1000 + 700 + epoch)
        if self.rl_forget_fraction is None:
            imgs, toks = torch.cat([f_img, r_img]), torch.cat([f_tok, r_tok])
            order = torch.randperm(nf + nr, generator=g)
            return [(imgs[order[i:i + bs]], toks[order[i:i + bs]]) for i in range(0, nf + nr, bs)]
        kf = self._forget_per_batch(bs)
        fo, ro = torch.randperm(nf, generator=g), torch.randperm(nr, generator=g)
        out = []
        for b, i in enumerate(range(0, nf, kf)):
            fi = fo[i:i + kf]
            ri = ro[torch.arange(b * (bs - kf), (b + 1) * (bs - kf)) % nr] if nr else ro[:0]
            out.append((torch.cat([f_img[fi], r_img[ri]]), torch.cat([f_tok[fi], r_tok[ri]])))
        return out

    def _forget_per_batch(self, bs: int) -> int:
        return max(1, min(bs, round(self.rl_forget_fraction * bs)))

    def _epoch_batches(self, data: MethodData, split: str, epoch: int):
        if split == "mixed":
            return self._mixed_batches(data, epoch)
        if split == "forget" and self.update == "rl":
            return data.batches("forget", epoch, tokens=self._random_captions(data, epoch))
        return data.batches(split, epoch)

    def _n_batches(self, data: MethodData, split: str) -> int:
        if split != "mixed":
            return data.n_batches(split)
        nf, nr, bs = data.forget_images.shape[0], data.retain_images.shape[0], data.batch_size
        if self.rl_forget_fraction is None:
            return -(-(nf + nr) // bs)
        return -(-nf // self._forget_per_batch(bs))

    def _loss(self, adapter, split: str, images, tokens) -> torch.Tensor:
        if split == "forget" and self.update == "rl":
            return adapter.retain_loss(images, tokens)  # CLIP loss on (forget image, random retain caption)
        return super()._loss(adapter, split, images, tokens)  # "mixed": the CLIP loss, as a retain pass
