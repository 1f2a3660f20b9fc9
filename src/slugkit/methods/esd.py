"""ESD — Erasing Concepts from Diffusion Models (Gandikota et al., ICCV 2023; spec ``baselines.md`` §3): fine-tune the
UNet so that its conditional noise prediction for the concept becomes the frozen model's **negatively guided** one,

    target = ε_θ*(z_t, ∅, t) − η·[ε_θ*(z_t, c, t) − ε_θ*(z_t, ∅, t)],   L = ‖ε_θ(z_t, c, t) − sg[target]‖²  (mean),

with z_t drawn data-free as the paper's (CompVis) code does (§3.2): per iteration k ~ U{0..S−1}; from fresh noise,
DDIM (η_DDIM = 0, S steps, classifier-free guidance ``start_guidance`` on c) with the **trainable** model until the
k-th index from the clean end (S − k steps run); the DDPM timestep t ~ U[k·T/S, (k+1)·T/S); two frozen forwards
(∅, c) without gradient and one trainable forward; Adam; batch 1.

Parameter sets (§3.3; validated, unlike the official strings): ``esd-x`` every parameter inside a cross-attention
(``attn2``) — the paper's choice for styles and UnlearnCanvas's for both styles and objects; ``esd-u`` every
parameter outside ``attn2``, the output convolution and the time embedding (the old ``noxattn``); ``esd-x-strict``
``attn2.to_k`` / ``to_v`` only; ``esd-all`` everything.

Defaults are the paper's (1,000 iterations, Adam lr 1e-5, η = 1, start guidance 3, 50 DDIM steps); a caller scales
them to its model (the embedded canvas does; say so where it reports). Unlike the official code the run is seeded
(noise, k and t from one generator), so it is deterministic on the CPU. The UNet passed in is **not** modified: a copy
trains and the changed tensors come back in a :class:`~slugkit.methods.diffusion.DiffusionEdit`.
"""

from __future__ import annotations

import copy
import time

import torch

from .diffusion import DiffusionEdit, encode, storage

PARAM_SETS = ("esd-x", "esd-u", "esd-x-strict", "esd-all")
DEFAULT_ITERATIONS, DEFAULT_LR, DEFAULT_NEGATIVE_GUIDANCE, DEFAULT_START_GUIDANCE, DEFAULT_DDIM_STEPS = (
    1000, 1e-5, 1.0, 3.0, 50)


def esd_parameters(unet: torch.nn.Module, which: str = "esd-x") -> list[str]:
    """The UNet parameter names ESD's ``which`` set trains (module docstring). ``ValueError`` for an unknown set or
    an empty selection."""
    if which not in PARAM_SETS:
        raise ValueError(f"unknown ESD parameter set {which!r}; choose one of {', '.join(PARAM_SETS)}")
    names = [n for n, _ in unet.named_parameters()]
    if which == "esd-x":
        out = [n for n in names if "attn2" in n]
    elif which == "esd-x-strict":
        out = [n for n in names if n.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))]
    elif which == "esd-u":
        out = [n for n in names if "attn2" not in n and not n.startswith(("conv_out", "time_embedding"))]
    else:
        out = names
    if not out:
        raise ValueError(f"ESD set {which!r} selects no parameter of this UNet (no cross-attention?)")
    return out


def _ddim(scheduler):
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(scheduler.config)


def esd(text_encoder, tokenizer, unet, scheduler, concept: str, *, which: str = "esd-x",
        iterations: int = DEFAULT_ITERATIONS, lr: float = DEFAULT_LR,
        negative_guidance: float = DEFAULT_NEGATIVE_GUIDANCE, start_guidance: float = DEFAULT_START_GUIDANCE,
        ddim_steps: int = DEFAULT_DDIM_STEPS, seed: int = 0, max_length: int | None = None, progress: bool = True,
        ) -> DiffusionEdit:
    """ESD on ``unet`` for the prompt ``concept`` (module docstring). ``scheduler``: the pipeline's noise schedule
    (a diffusers scheduler; a DDIM sampler is built from its config); latents are ``[1, in_channels, sample_size,
    sample_size]`` of the UNet's config. Returns the trained tensors of the set (float32, CPU) with the wall time
    and the loss every 50 iterations in ``info["log"]``. ``ValueError`` for an empty concept, a non-positive
    iteration count or step count, or an unknown parameter set."""
    from tqdm.auto import tqdm

    if not concept or not concept.strip():
        raise ValueError("ESD needs the concept's prompt (got an empty string)")
    if iterations < 1 or ddim_steps < 1:
        raise ValueError(f"iterations and ddim_steps must be >= 1 (got {iterations}, {ddim_steps})")
    t0 = time.perf_counter()
    names = esd_parameters(unet, which)
    device = next(unet.parameters()).device
    frozen = unet.eval()
    train = copy.deepcopy(unet).train(False)
    train.requires_grad_(False)
    params = dict(train.named_parameters())
    chosen = [params[n] for n in names]
    for p in chosen:
        p.requires_grad_(True)
    opt = torch.optim.Adam(chosen, lr=lr)
    emb_c = encode(text_encoder, tokenizer, [concept], max_length).to(device)
    emb_0 = encode(text_encoder, tokenizer, [""], max_length).to(device)
    cfg = unet.config
    shape = (1, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    sampler = _ddim(scheduler)
    sampler.set_timesteps(ddim_steps)
    n_train = sampler.config.num_train_timesteps
    g = torch.Generator().manual_seed(seed)
    log, losses = [], []
    for it in tqdm(range(iterations), desc=f"ESD {which}", disable=not progress):
        k = int(torch.randint(ddim_steps, (1,), generator=g))
        z = torch.randn(shape, generator=g).to(device)
        with torch.no_grad():
            for t in sampler.timesteps[: ddim_steps - k]:
                eps = train(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([emb_0, emb_c])).sample
                e_u, e_c = eps.chunk(2)
                z = sampler.step(e_u + start_guidance * (e_c - e_u), t, z).prev_sample
            lo, hi = round(k * n_train / ddim_steps), round((k + 1) * n_train / ddim_steps)
            t_ddpm = torch.randint(lo, max(hi, lo + 1), (1,), generator=g).to(device)
            e0 = frozen(z, t_ddpm, encoder_hidden_states=emb_0).sample
            ep = frozen(z, t_ddpm, encoder_hidden_states=emb_c).sample
            target = e0 - negative_guidance * (ep - e0)
        with torch.enable_grad():
            loss = torch.nn.functional.mse_loss(train(z, t_ddpm, encoder_hidden_states=emb_c).sample, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        losses.append(loss.item())
        if (it + 1) % 50 == 0 or it + 1 == iterations:
            log.append({"iteration": it + 1, "loss": sum(losses[-50:]) / len(losses[-50:])})
    out = {n: params[n].detach().float().cpu().clone() for n in names}
    return DiffusionEdit(out, time.perf_counter() - t0, storage(out), None,
                         {"concept": concept, "which": which, "iterations": iterations, "lr": lr,
                          "negative_guidance": negative_guidance, "start_guidance": start_guidance,
                          "ddim_steps": ddim_steps, "seed": seed, "params": sum(t.numel() for t in out.values()),
                          "tensors": len(out), "log": log})
