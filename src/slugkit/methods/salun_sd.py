"""SalUn for diffusion models (Fan et al., ICLR 2024; spec ``baselines.md`` §2.2 "Stable Diffusion" and §2.5): a weight
saliency mask over the UNet, then masked fine-tuning with the diffusion analogue of random labelling.

**Mask** (``SD/train-scripts/generate_mask.py``): one pass over the forget pairs (image, concept prompt c) in batches;
per batch one t ~ U{0..T−1} and one ε per sample, z_t = √ᾱ_t·z_0 + √(1−ᾱ_t)·ε, the guided prediction
(1 + w)·ε_θ(z_t, c) − w·ε_θ(z_t, ∅) with w = 7.5, loss −MSE(ε, prediction), backward through both branches; the
**signed** gradients summed over batches, then |·| and one global top-ρ fraction over every UNet scalar (ρ = 0.5;
ties by flat index, :func:`slugkit.methods.salun.saliency_mask`).

**Update** (``random_label.py``): per step a forget batch and a retain batch (cycled); forget term
‖ε_θ(z_t, c) − sg[ε_θ(z_t, c′)]‖² with the same z_t and t — c′ the pseudo prompt, the *current* model's prediction,
not a frozen copy's; retain term the usual diffusion loss ‖ε_θ(z_t, c_r) − ε‖² on retain pairs with their own
prompts; L = L_f + α·L_r (α = 1.0 as UnlearnCanvas runs it; the script default 0.1 and the README's 0.5 are other
settings); Adam (lr 1e-5, no weight decay, no schedule, no clipping); the gradient multiplied by the mask before each
step, every UNet parameter in the optimiser (``train_method=full``). The ported mask stays on the model's device (the
reference copies it from the CPU every step; same numbers).

Images enter as the UNet's input space: ``to_latent`` maps a batch of images in [−1, 1] to what the UNet denoises (a
VAE's scaled latents for SD; None for a pixel-space UNet such as the embedded text-to-image model's). The run is
seeded and leaves the caller's UNet untouched (a copy trains); the changed tensors come back in a
:class:`~slugkit.methods.diffusion.DiffusionEdit`.
"""

from __future__ import annotations

import copy
import time

import torch

from .diffusion import DiffusionEdit, encode, storage
from .salun import saliency_mask

DEFAULT_FRACTION, DEFAULT_MASK_GUIDANCE, DEFAULT_ALPHA, DEFAULT_LR, DEFAULT_BATCH = 0.5, 7.5, 1.0, 1e-5, 8


def _prepare(pairs, name: str, to_latent, text_encoder, tokenizer, max_length):
    if not pairs:
        raise ValueError(f"SalUn needs {name} pairs (image, prompt); got none")
    images = torch.stack([im for im, _ in pairs]).float()
    if images.ndim != 4:
        raise ValueError(f"{name} images must be [3, H, W] tensors in [-1, 1]; got a batch of shape "
                         f"{tuple(images.shape)}")
    with torch.no_grad():
        z0 = to_latent(images) if to_latent is not None else images
    return z0, encode(text_encoder, tokenizer, [p for _, p in pairs], max_length)


def _noised(scheduler, z0, g):
    n_train = scheduler.config.num_train_timesteps
    t = torch.randint(n_train, (z0.shape[0],), generator=g)
    eps = torch.randn(z0.shape, generator=g)
    return scheduler.add_noise(z0, eps, t), t, eps


def saliency(unet, scheduler, z0, cond, null, *, batch_size: int = DEFAULT_BATCH,
             guidance: float = DEFAULT_MASK_GUIDANCE, seed: int = 0) -> dict[str, torch.Tensor]:
    """|Σ_batches ∇θ −MSE(ε, (1 + w)·ε_θ(z_t, c) − w·ε_θ(z_t, ∅))| per UNet parameter (module docstring), float32,
    same shapes. ``z0``: ``[N, C, H, W]`` inputs of the UNet; ``cond``: ``[N, L, d]``; ``null``: ``[1, L, d]``."""
    g = torch.Generator().manual_seed(seed)
    params = dict(unet.named_parameters())
    total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    with torch.enable_grad():
        for lo in range(0, z0.shape[0], batch_size):
            zb, cb = z0[lo:lo + batch_size], cond[lo:lo + batch_size]
            zt, t, eps = _noised(scheduler, zb, g)
            e_c = unet(zt, t, encoder_hidden_states=cb).sample
            e_0 = unet(zt, t, encoder_hidden_states=null.expand(len(zb), -1, -1)).sample
            loss = -torch.nn.functional.mse_loss(eps, (1 + guidance) * e_c - guidance * e_0)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for n, gr in zip(params, grads):
                if gr is not None:
                    total[n] += gr.float()
    return {n: t.abs() for n, t in total.items()}


def salun_sd(text_encoder, tokenizer, unet, scheduler, forget: list, retain: list, pseudo: str | list[str], *,
             steps: int = 100, lr: float = DEFAULT_LR, alpha: float = DEFAULT_ALPHA,
             fraction: float = DEFAULT_FRACTION, batch_size: int = DEFAULT_BATCH,
             mask_guidance: float = DEFAULT_MASK_GUIDANCE, to_latent=None, seed: int = 0,
             max_length: int | None = None, progress: bool = True) -> DiffusionEdit:
    """SalUn on ``unet`` (module docstring). ``forget`` / ``retain``: ``[(image [3, H, W] in [−1, 1], prompt)]``;
    ``pseudo``: c′, one prompt for all forget pairs or one per pair; ``scheduler``: the pipeline's noise schedule
    (``add_noise``). Returns the UNet tensors the mask touches (float32, CPU), the wall time, and in ``info`` the
    mask's size and the losses every 10 steps. ``ValueError`` for empty forget or retain pairs, a pseudo list of
    another length, ``fraction`` outside (0, 1] or ``steps`` < 1."""
    from tqdm.auto import tqdm

    if not 0 < fraction <= 1:
        raise ValueError(f"saliency fraction must be in (0, 1], got {fraction}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    pseudos = [pseudo] * len(forget) if isinstance(pseudo, str) else list(pseudo)
    if len(pseudos) != len(forget):
        raise ValueError(f"{len(pseudos)} pseudo prompts for {len(forget)} forget pairs: give one, or one per pair")
    t0 = time.perf_counter()
    z_f, c_f = _prepare(forget, "forget", to_latent, text_encoder, tokenizer, max_length)
    z_r, c_r = _prepare(retain, "retain", to_latent, text_encoder, tokenizer, max_length)
    c_p = encode(text_encoder, tokenizer, pseudos, max_length)
    null = encode(text_encoder, tokenizer, [""], max_length)
    train = copy.deepcopy(unet).eval()  # no dropout in these UNets; eval keeps the run deterministic
    train.requires_grad_(True)
    mask = saliency_mask(saliency(train, scheduler, z_f, c_f, null, batch_size=batch_size, guidance=mask_guidance,
                                  seed=seed), fraction)
    params = dict(train.named_parameters())
    opt = torch.optim.Adam(params.values(), lr=lr)
    g = torch.Generator().manual_seed(seed + 1)
    perm_f, perm_r = torch.randperm(len(z_f), generator=g), torch.randperm(len(z_r), generator=g)
    log, losses = [], []
    for step in tqdm(range(steps), desc="SalUn (SD)", disable=not progress):
        fi = perm_f[torch.arange(step * batch_size, (step + 1) * batch_size) % len(z_f)]
        ri = perm_r[torch.arange(step * batch_size, (step + 1) * batch_size) % len(z_r)]
        zt, t, _ = _noised(scheduler, z_f[fi], g)
        with torch.no_grad():
            target = train(zt, t, encoder_hidden_states=c_p[fi]).sample
        zr, tr, er = _noised(scheduler, z_r[ri], g)
        with torch.enable_grad():
            l_f = torch.nn.functional.mse_loss(train(zt, t, encoder_hidden_states=c_f[fi]).sample, target)
            l_r = torch.nn.functional.mse_loss(train(zr, tr, encoder_hidden_states=c_r[ri]).sample, er)
            loss = l_f + alpha * l_r
            opt.zero_grad(set_to_none=True)
            loss.backward()
        with torch.no_grad():
            for n, p in params.items():
                if p.grad is not None:
                    p.grad.mul_(mask[n])
        opt.step()
        losses.append((l_f.item(), l_r.item()))
        if (step + 1) % 10 == 0 or step + 1 == steps:
            recent = losses[-10:]
            log.append({"step": step + 1, "forget_loss": sum(a for a, _ in recent) / len(recent),
                        "retain_loss": sum(b for _, b in recent) / len(recent)})
    touched = [n for n in params if bool(mask[n].any())]
    out = {n: params[n].detach().float().cpu().clone() for n in touched}
    masked = int(sum(int(mask[n].sum()) for n in params))
    return DiffusionEdit(out, time.perf_counter() - t0, storage(out), None,
                         {"steps": steps, "lr": lr, "alpha": alpha, "fraction": fraction, "batch_size": batch_size,
                          "mask_guidance": mask_guidance, "masked_params": masked,
                          "params": sum(p.numel() for p in params.values()), "tensors": len(out), "seed": seed,
                          "forget_pairs": len(forget), "retain_pairs": len(retain), "pseudo": pseudos[:3],
                          "log": log})
