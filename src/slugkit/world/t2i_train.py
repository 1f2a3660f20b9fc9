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
    """``slug world train-t2i`` (``python -m slugkit.world.t2i_train``). ``--out`` is required: it defaulted to the
    shipped model's folder inside the package, and a 1-second trial run replaced the shipped UNet with an untrained
    one (fifteenth trial). The folder is written whole or not at all, and only after at least one training step."""
    import shutil
    import sys

    from slugkit.common.files import atomic_dir
    from slugkit.common.argv import SlugParser, given_twice, seed as seed_type
    from slugkit.common.outguard import check_model_out

    ap = SlugParser(prog="slug world train-t2i", description="train the embedded text-to-image UNet "
                    "(deterministic for a fixed thread count)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", required=True, default=argparse.SUPPRESS,  # no "(default: None)" in --help
                    help="folder to write: unet.safetensors and t2i_config.json (the shipped "
                         f"model is in {T2I_DIR}; pass that to retrain it)")
    ap.add_argument("--overwrite", action="store_true", help="replace a model this command wrote in --out (a folder "
                                                             "of other files is refused; your files in it are kept)")
    ap.add_argument("--steps", type=int, default=T2IConfig.steps, help="optimizer steps (the LR schedule's length)")
    ap.add_argument("--batch-size", type=int, default=T2IConfig.batch_size, help="images per step")
    ap.add_argument("--channels", default="16,32,64", help="the UNet's block_out_channels, comma-separated")
    ap.add_argument("--cond-noise", type=float, default=T2IConfig.cond_noise,
                    help="relative noise on the text states during training")
    ap.add_argument("--lr", type=float, default=T2IConfig.lr, help="peak learning rate")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (bit-identical for a fixed count)")
    ap.add_argument("--seed", type=seed_type, default=0, help="seed of the training")
    ap.add_argument("--time-budget", type=float, default=None, help="stop after this many seconds (not reproducible)")
    ap.add_argument("--stop-at", type=int, default=None,
                    help="stop after this many steps; the LR schedule still spans --steps (deterministic)")
    ap.add_argument("--eval-per-class", type=int, default=10, help="generated images per concept for the report "
                                                                   "(0: none)")
    twice = given_twice(ap, list(sys.argv[1:] if argv is None else argv))
    if twice:
        print(f"error: {twice}", file=sys.stderr)
        return 2
    a = ap.parse_args(argv)
    bad = [f"--{k.replace('_', '-')} must be >= 1, got {v}" for k, v in
           (("steps", a.steps), ("batch_size", a.batch_size), ("threads", a.threads)) if v < 1]
    try:
        channels = tuple(int(c) for c in a.channels.split(","))
    except ValueError:
        channels, bad = (), bad + [f"--channels {a.channels!r}: give comma-separated integers, e.g. 16,32,64"]
    groups = T2IConfig.norm_num_groups  # diffusers' GroupNorm: a traceback after the data was drawn (20th trial)
    if channels and (len(channels) != 3 or any(c < groups or c % groups for c in channels)):
        bad.append(f"--channels {a.channels!r}: give 3 widths (the UNet's three blocks), each a positive multiple of "
                   f"{groups} (its GroupNorm groups), e.g. 16,32,64")
    import math

    for flag, v, ok, what in (("--cond-noise", a.cond_noise, a.cond_noise >= 0, "a finite number >= 0"),
                              ("--lr", a.lr, a.lr > 0, "a finite number > 0"),
                              ("--time-budget", a.time_budget, a.time_budget is None or a.time_budget > 0,
                               "a number of seconds > 0 (leave it out for no budget)")):
        if v is not None and (not ok or not math.isfinite(v)):
            bad.append(f"{flag} must be {what}, got {v}")
    if a.stop_at is not None and not 0 <= a.stop_at <= a.steps:
        bad.append(f"--stop-at must be in [0, --steps {a.steps}] (it stops a run whose LR schedule spans --steps), "
                   f"got {a.stop_at}")
    if a.eval_per_class < 0:
        bad.append(f"--eval-per-class must be >= 0, got {a.eval_per_class}")
    out = Path(a.out)
    try:
        check_model_out(out, a.overwrite, CONFIG_FILE)  # before the training, so none is thrown away
    except FileExistsError as e:
        bad.append(str(e))
    if bad:
        print(f"error: {bad[0]}", file=sys.stderr)
        return 2
    cfg = T2IConfig(steps=a.steps, batch_size=a.batch_size, cond_noise=a.cond_noise, lr=a.lr, threads=a.threads,
                    seed=a.seed, time_budget_s=a.time_budget, stop_at=a.stop_at, block_out_channels=channels)
    checkpoint = Path(f"{out}.checkpoint")  # snapshots during training, beside --out; removed after success
    unet, info = train_t2i(cfg, checkpoint=checkpoint)
    if not info["steps_done"]:
        print(f"error: no training step finished (--time-budget {a.time_budget}, --stop-at {a.stop_at}); nothing "
              f"written to {out}", file=sys.stderr)
        return 2
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
    with atomic_dir(out, a.overwrite, marker=CONFIG_FILE) as tmp:
        _write_unet(tmp, unet, cfg, info)
    shutil.rmtree(checkpoint, ignore_errors=True)
    print(f"wrote {out / UNET_FILE} ({(out / UNET_FILE).stat().st_size:,} bytes); {info['steps_done']} steps in "
          f"{info['train_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
