"""Training the embedded text-to-image UNet: ``slug world train-t2i`` (``python -m slugkit.world.t2i_train``).

The model, its pipeline and its judge are in :mod:`slugkit.world.t2i`; this module only trains the UNet and writes
``unet.safetensors`` + ``t2i_config.json`` (the design choices — min-SNR weighting, EMA, caption dropout,
conditioning noise — are explained there). Seeded, fixed thread count: a rerun is bit-identical.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from slugkit.common.files import atomic_write_bytes
from slugkit.world import render as world
from slugkit.world.t2i import (CONFIG_FILE, CONTEXT_LENGTH, DEFAULT_GUIDANCE, T2I_DIR, UNET_FILE, ConceptJudge,
                               T2IConfig, _require_diffusers, generation_plan, make_scheduler, pipeline_with_unet,
                               recognition, render_plain)

# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def _num_threads(n: int):
    from slugkit.world.train import _num_threads as num_threads  # one implementation of the thread pinning

    return num_threads(n)


def _train_data(per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` float [N,3,32,32] in [-1,1] and class labels; plain renders from a dedicated seed."""
    xs, ys = [], []
    for c in world.UTILITY_CLASSES:
        rng = np.random.default_rng([seed, 7001, c.index])
        for _ in range(per_class):
            xs.append(np.asarray(render_plain(c, rng), dtype=np.uint8))
            ys.append(c.index)
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    return x.contiguous(), torch.tensor(ys)


def _lr(step: int, cfg: T2IConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def train_t2i(cfg: T2IConfig, progress: bool = True, log_every: int = 100,
              checkpoint: str | os.PathLike | None = None, data=None, flip: bool = True) -> tuple[object, dict]:
    """Train the UNet; returns ``(ema_unet, info)``. Deterministic for a fixed config (thread count included).

    ``data``: ``(prompts, images, rows)`` to train on instead of the object world — ``prompts`` every caption in
    groups of equal size n (one group per class; the null prompt is added here), ``images`` float ``[N, 3, 32, 32]``
    in [−1, 1], ``rows`` ``[N]`` the index of each image's group (its caption: one of the group's n, drawn per
    step); the embedded canvas (:mod:`slugkit.world.canvas_train`) passes n = 1. ``flip``: random horizontal flips."""
    with _num_threads(cfg.threads):
        return _train(cfg, progress, log_every, checkpoint, data, flip)


def _object_data(cfg: T2IConfig):
    """The object world's captions (30 classes x 8 templates) and plain renders."""
    caps = [world.utility_caption(c, j) for c in world.UTILITY_CLASSES
            for j in range(len(world.UTILITY_CAPTION_TEMPLATES))]
    x_all, y_all = _train_data(cfg.train_per_class, cfg.seed)
    return caps, x_all, y_all


def _train(cfg: T2IConfig, progress: bool, log_every: int, checkpoint, data=None, flip: bool = True
           ) -> tuple[object, dict]:
    diffusers = _require_diffusers()
    from tqdm.auto import tqdm

    from slugkit.models.convert import embedded_hf_clip

    t0 = time.time()
    torch.manual_seed(cfg.seed)
    hf, tok, _ = embedded_hf_clip()
    te = hf.text_model.eval()
    width = hf.config.text_config.hidden_size
    caps, x_all, y_all = data if data is not None else _object_data(cfg)
    n_t = len(caps) // (int(y_all.max()) + 1)  # captions per class
    # Every caption the training can show, plus the null prompt (index -1).
    flat = list(caps) + [""]
    with torch.no_grad():
        ids = tok(flat, padding="max_length", max_length=CONTEXT_LENGTH, truncation=True,
                  return_tensors="pt")["input_ids"]
        states = te(input_ids=ids).last_hidden_state  # [241, ctx, width] for the object world
    t_data = time.time() - t0

    torch.manual_seed(cfg.seed)
    unet = diffusers.UNet2DConditionModel(**cfg.unet_kwargs(width))
    ema = diffusers.UNet2DConditionModel(**cfg.unet_kwargs(width))
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    sched = make_scheduler("ddpm")
    ac = sched.alphas_cumprod.float()
    snr = ac / (1 - ac)
    w_t = torch.clamp(snr, max=cfg.min_snr_gamma) / snr  # min-SNR weighting for epsilon prediction
    decay, no_decay = [], []
    for n, p in unet.named_parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    log, losses, steps_done = [], [], 0
    bar = tqdm(range(cfg.steps), desc="train t2i", disable=not progress)
    unet.train()
    for step in bar:
        if cfg.time_budget_s and time.time() - t0 > cfg.time_budget_s:
            break  # wall-clock stop: not reproducible; rerun with --stop-at <steps_done> for the same weights
        if cfg.stop_at is not None and step >= cfg.stop_at:
            break
        idx = torch.randint(len(x_all), (cfg.batch_size,), generator=g)
        x0 = x_all[idx]
        flips = torch.rand(cfg.batch_size, generator=g) < 0.5  # drawn either way: one stream of random numbers
        if flip:
            x0 = torch.where(flips[:, None, None, None], x0.flip(-1), x0)
        tmpl = torch.randint(n_t, (cfg.batch_size,), generator=g)
        cap = y_all[idx] * n_t + tmpl
        drop = torch.rand(cfg.batch_size, generator=g) < cfg.caption_dropout
        cap = torch.where(drop, torch.full_like(cap, len(flat) - 1), cap)
        h = states[cap]
        rel = torch.rand(cfg.batch_size, 1, 1, generator=g) * cfg.cond_noise
        scale = h.norm(dim=-1, keepdim=True) / math.sqrt(h.shape[-1])
        h = h + rel * scale * torch.randn(h.shape, generator=g)
        t = torch.randint(0, 1000, (cfg.batch_size,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        xt = sched.add_noise(x0, noise, t)
        pred = unet(xt, t, encoder_hidden_states=h).sample
        loss = ((pred - noise) ** 2).mean(dim=(1, 2, 3)).mul(w_t[t]).mean()
        for pg in opt.param_groups:
            pg["lr"] = _lr(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(cfg.ema_decay, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.mul_(d).add_(p.detach(), alpha=1 - d)
        losses.append(loss.item())
        steps_done = step + 1
        if steps_done % log_every == 0:
            m = float(np.mean(losses[-log_every:]))
            log.append({"step": steps_done, "loss": m, "elapsed_s": round(time.time() - t0, 1)})
            bar.set_postfix(loss=f"{m:.4f}")
            if checkpoint:
                _write_unet(Path(checkpoint), ema, cfg, {"steps_done": steps_done, "log": log})
    ema.eval()
    info = {"steps_done": steps_done, "train_s": round(time.time() - t0, 1), "data_s": round(t_data, 1),
            "params": sum(p.numel() for p in ema.parameters()), "log": log}
    return ema, info


def _unet_bytes(unet) -> bytes:
    from safetensors.torch import save

    sd = {k: v.detach().float().contiguous().clone() for k, v in unet.state_dict().items()}
    return save(sd, metadata={"format": "pt"})


def _write_unet(out: Path, unet, cfg: T2IConfig, info: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / UNET_FILE, _unet_bytes(unet))
    width = unet.config.cross_attention_dim
    meta = {"unet": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.unet_kwargs(width).items()},
            "train": asdict(cfg), "info": info,
            "versions": {"torch": torch.__version__, "python": platform.python_version()}}
    atomic_write_bytes(out / CONFIG_FILE, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())


# ----------------------------------------------------------------------------------------------------------------
# CLI: python -m slugkit.world.t2i_train --out DIR
# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="train the embedded text-to-image UNet")
    ap.add_argument("--out", default=str(T2I_DIR))
    ap.add_argument("--steps", type=int, default=T2IConfig.steps)
    ap.add_argument("--batch-size", type=int, default=T2IConfig.batch_size)
    ap.add_argument("--channels", default="16,32,64")
    ap.add_argument("--cond-noise", type=float, default=T2IConfig.cond_noise)
    ap.add_argument("--lr", type=float, default=T2IConfig.lr)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-budget", type=float, default=None, help="stop after this many seconds")
    ap.add_argument("--stop-at", type=int, default=None,
                    help="stop after this many steps; the LR schedule still spans --steps (deterministic)")
    ap.add_argument("--eval-per-class", type=int, default=10)
    a = ap.parse_args(argv)
    cfg = T2IConfig(steps=a.steps, batch_size=a.batch_size, cond_noise=a.cond_noise, lr=a.lr, threads=a.threads,
                    seed=a.seed, time_budget_s=a.time_budget, stop_at=a.stop_at,
                    block_out_channels=tuple(int(c) for c in a.channels.split(",")))
    out = Path(a.out)
    unet, info = train_t2i(cfg, checkpoint=out / "checkpoint")
    if a.eval_per_class:
        with _num_threads(cfg.threads):
            p = pipeline_with_unet(unet)
            t = time.time()
            rec, _, _ = recognition(p, ConceptJudge(), generation_plan(None, 0, a.eval_per_class), progress=True)
            info["eval"] = {"per_concept": rec, "mean": float(np.mean(list(rec.values()))),
                            "images_per_concept": a.eval_per_class, "sampler": "DDIM 20 steps",
                            "guidance": DEFAULT_GUIDANCE, "judge": "embedded CLIP, zero-shot over the 30 concepts",
                            "eval_s": round(time.time() - t, 1)}
            print(json.dumps(info["eval"], indent=1))
    _write_unet(out, unet, cfg, info)
    print(f"wrote {out / UNET_FILE} ({(out / UNET_FILE).stat().st_size:,} bytes); {info['steps_done']} steps in "
          f"{info['train_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
