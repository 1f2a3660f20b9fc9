"""Deterministic CPU training of the tiny open_clip CLIP that ships with slugkit (``assets/embedded``).

The recipe is the one measured in ``world-notes.md`` (section 2) for the v2 ("upright shapes") world:

* open_clip's own ``CLIP`` class with a custom config: ViT 32 px / patch 8 / width 64 / 4 blocks, text tower
  width 64 / 4 blocks / 2 heads / context 20, embedding dim 64 (3.59 M parameters, 3.16 M of them the token table);
* AdamW lr 2e-3, betas (0.9, 0.98), weight decay 0.1 on matrices only, 200 warm-up steps then cosine decay,
  logit scale clamped to ln(100);
* **every batch holds exactly one image of every class** (60 identities + 30 utility classes = 90 pairs), so no
  caption in a batch is a false negative for another image of the batch;
* a horizontal flip of the whole batch on every other step (label-preserving: the upright shapes are left-right
  symmetric, and a flipped stripe is still a stripe);
* images are round-tripped through JPEG exactly as :func:`slugkit.data.shards.encode_image` writes them, so the
  model is trained on what the shards and image folders hold;
* seeded, with a fixed ``torch.set_num_threads``: a rerun with the same thread count is bit-identical.

The output directory is an open_clip ``local-dir:`` model::

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + out_dir)
    tokenizer = open_clip.get_tokenizer("local-dir:" + out_dir)

Run ``slug world train --out DIR [--steps N] [--vision-layers N]`` (:mod:`slugkit.cli.world`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from slugkit.common.files import atomic_dir, atomic_write_bytes
from slugkit.common.outguard import check_model_out
from slugkit.world import render as world
from slugkit.world.evaluate import evaluate_world_model
from slugkit.world.render import jpeg_roundtrip

MODEL_CFG: dict = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 4},
}
# OpenAI CLIP normalisation (open_clip.OPENAI_DATASET_MEAN / _STD), written out so this module imports without
# open_clip.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESS_CFG: dict = {
    "size": 32,
    "mean": list(MEAN),
    "std": list(STD),
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}
CONTEXT_LENGTH = MODEL_CFG["text_cfg"]["context_length"]

DEFAULT_STEPS = 3000  # world-notes: v2 reaches 99.8% identity / 97.8% utility at 3000 steps
DEFAULT_THREADS = 1
DEFAULT_TRAIN_PER_CLASS = 300
LR = 2e-3
BETAS = (0.9, 0.98)
WEIGHT_DECAY = 0.1
WARMUP_STEPS = 200
MAX_LOGIT_SCALE = math.log(100.0)

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
REPORT_NAME = "train_report.json"


# ----------------------------------------------------------------------------------------------------------------
# Model, tokenizer, images
# ----------------------------------------------------------------------------------------------------------------


def model_cfg(vision_layers: int | None = None) -> dict:
    """:data:`MODEL_CFG`, with ``vision_layers`` blocks in the image tower when given (the shipped CLIP has 4; a VLM
    built on an 8-block one, ``slug world train-vlm --clip``, forgets far more selectively: LLaVA reads the tower's
    second-to-last layer, which in 4 blocks holds the identities' shared attributes more than the identities;
    README, the VLM section). Raises ``ValueError`` outside 2..24."""
    cfg = json.loads(json.dumps(MODEL_CFG))
    if vision_layers is not None:
        if isinstance(vision_layers, bool) or not isinstance(vision_layers, int) or not 2 <= vision_layers <= 24:
            raise ValueError(f"--vision-layers: must be in [2, 24] (image-tower blocks), got {vision_layers!r}")
        cfg["vision_cfg"]["layers"] = vision_layers
    return cfg


def build_model(seed: int = 0, vision_layers: int | None = None):
    """A freshly initialised open_clip ``CLIP`` with :func:`model_cfg` (initialisation seeded with ``seed``)."""
    import open_clip

    torch.manual_seed(seed)
    return open_clip.model.CLIP(**model_cfg(vision_layers))


def build_tokenizer():
    """open_clip's bundled BPE ``SimpleTokenizer`` with context length 20 (what ``get_tokenizer`` gives at load)."""
    import open_clip

    return open_clip.tokenizer.SimpleTokenizer(context_length=CONTEXT_LENGTH)


def images_to_uint8(images: list[Image.Image]) -> torch.Tensor:
    """Stack 32x32 RGB images into a ``[N, 3, 32, 32]`` uint8 tensor."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


_MEAN_T = torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1)
_STD_T = torch.tensor(STD, dtype=torch.float32).view(1, 3, 1, 1)


def normalise(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, 3, H, W]`` -> model input; the same float ops as torchvision ``ToTensor`` + ``Normalize``, so the
    result is bit-identical to open_clip's eval transform on a 32x32 image (checked by :func:`check_preprocess`)."""
    return x_uint8.to(torch.float32).div(255).sub(_MEAN_T).div(_STD_T)


def check_preprocess(preprocess, images: list[Image.Image]) -> None:
    """Raise unless ``preprocess`` (open_clip's eval transform) maps ``images`` exactly to :func:`normalise`."""
    ours = normalise(images_to_uint8(images))
    theirs = torch.stack([preprocess(im) for im in images])
    if ours.shape != theirs.shape or not torch.equal(ours, theirs):
        diff = (ours - theirs).abs().max().item() if ours.shape == theirs.shape else float("nan")
        raise RuntimeError(
            f"open_clip's preprocessing differs from the training normalisation (max abs diff {diff}); "
            f"check {CONFIG_NAME}'s preprocess_cfg"
        )


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def _lr_at(step: int, steps: int, warmup: int = WARMUP_STEPS, base_lr: float = LR) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 (open_clip's ``cosine_lr``)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    e, es = step - warmup, max(1, steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * e / es)) * base_lr


def make_train_tensors(per_class: int, tokenizer, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Split "train", one row per class (60 identities, then 30 utility classes).

    Returns uint8 images ``[90, per_class, 3, 32, 32]`` (JPEG round-tripped) and tokens ``[90, per_class, 20]``.
    """
    from ..common.progress import vanishing_bar

    classes = [("identity", c) for c in range(len(world.IDENTITIES))]
    classes += [("utility", c) for c in range(len(world.UTILITY_CLASSES))]
    imgs, toks = [], []
    for kind, c in vanishing_bar(classes, desc="generating train split", disable=not progress):
        samples = world.make_samples("train", kind, per_class, classes=[c])
        imgs.append(images_to_uint8([jpeg_roundtrip(s.image) for s in samples]))
        toks.append(tokenizer([s.caption for s in samples]))
    return torch.stack(imgs), torch.stack(toks)


def _param_groups(model) -> list[dict]:
    """Weight decay on matrices only (ndim >= 2, which includes the token and positional embeddings, as in open_clip's
    own training); gains, biases, the class embedding and the logit scale are not decayed."""
    decay = [p for _, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for _, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]


def _make_optimizer(model) -> torch.optim.Optimizer:
    """AdamW; the fused CPU kernel (torch >= 2.4) makes the optimizer step ~5x cheaper than the default loop, which
    matters here because the 49408x64 token table (88% of the parameters) is updated densely every step."""
    groups = _param_groups(model)
    try:
        return torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=1e-6, fused=True)
    except (RuntimeError, TypeError, ValueError):  # older torch: no fused AdamW on CPU
        return torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=1e-6)


@contextlib.contextmanager
def _num_threads(n: int):
    """Run with ``torch.set_num_threads(n)`` (results are bit-identical only for a fixed thread count); restore after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_model(
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    threads: int = DEFAULT_THREADS,
    per_class: int = DEFAULT_TRAIN_PER_CLASS,
    progress: bool = True,
    vision_layers: int | None = None,
):
    """Train and return ``(model, tokenizer, info)``; deterministic for a fixed (steps, seed, threads, per_class,
    vision_layers)."""
    model_cfg(vision_layers)  # checked before the data is drawn
    with _num_threads(threads):
        return _train_model(steps, seed, per_class, progress, vision_layers)


def _train_model(steps: int, seed: int, per_class: int, progress: bool, vision_layers: int | None = None):
    from tqdm import tqdm

    tokenizer = build_tokenizer()
    t0 = time.perf_counter()
    images, tokens = make_train_tensors(per_class, tokenizer, progress=progress)
    data_s = time.perf_counter() - t0
    n_classes = images.shape[0]

    model = build_model(seed, vision_layers)
    model.train()
    opt = _make_optimizer(model)
    labels = torch.arange(n_classes)
    class_idx = torch.arange(n_classes)[:, None]

    t1 = time.perf_counter()
    order = None
    bar = tqdm(range(steps), desc="training tiny CLIP", disable=not progress, dynamic_ncols=True)
    losses = []
    for step in bar:
        # One image of each class per batch: each class walks through its own permutation of its training images,
        # reshuffled every epoch (epoch = per_class steps) from a seed that depends only on (seed, epoch).
        epoch, pos = divmod(step, per_class)
        if pos == 0:
            rng = np.random.default_rng([seed, epoch])
            order = torch.from_numpy(np.argsort(rng.random((n_classes, per_class)), axis=1))
        pick = order[:, pos : pos + 1]
        x = normalise(images[class_idx, pick].squeeze(1))
        if step % 2 == 1:  # flip every other step (upright shapes are left-right symmetric)
            x = torch.flip(x, dims=[-1])
        t = tokens[class_idx, pick].squeeze(1)

        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps)
        img_f, txt_f, scale = model(x, t)
        logits = scale * img_f @ txt_f.t()
        loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        losses.append(loss.item())
        if progress and (step % 25 == 0 or step == steps - 1):
            bar.set_postfix(loss=f"{np.mean(losses[-25:]):.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
    bar.close()
    model.eval()
    info = {
        "data_seconds": round(data_s, 2),
        "train_seconds": round(time.perf_counter() - t1, 2),
        "final_loss_mean_last100": float(np.mean(losses[-100:])) if losses else None,
        "logit_scale": float(model.logit_scale.exp().item()),
        "optimizer": "AdamW (fused)" if opt.defaults.get("fused") else "AdamW",
    }
    return model, tokenizer, info


def _state_dict_bytes(model) -> bytes:
    from safetensors.torch import save

    sd = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in model.state_dict().items()}
    return save(sd, metadata={"format": "pt"})


def load_world_model(model_dir: str | os.PathLike):
    """``(model, tokenizer, preprocess)`` of a ``local-dir`` model written by :func:`train_embedded` (strict load)."""
    import open_clip

    spec = "local-dir:" + str(Path(model_dir).resolve())
    model, _, preprocess = open_clip.create_model_and_transforms(spec)
    tokenizer = open_clip.get_tokenizer(spec)
    model.eval()
    return model, tokenizer, preprocess


def train_embedded(
    out_dir: str | os.PathLike,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    threads: int = DEFAULT_THREADS,
    progress: bool = True,
    per_class: int = DEFAULT_TRAIN_PER_CLASS,
    eval_per_class: int = 50,
    overwrite: bool = False,
    vision_layers: int | None = None,
) -> dict:
    """Train the embedded tiny CLIP (``vision_layers`` image-tower blocks: :func:`model_cfg`) and write it to
    ``out_dir`` as an open_clip ``local-dir`` model.

    Writes ``open_clip_config.json``, ``open_clip_model.safetensors`` and ``train_report.json``, the folder whole or
    not at all (:func:`slugkit.common.files.atomic_dir`; a user's files in a replaced folder are kept). A non-empty
    ``out_dir`` needs ``overwrite`` and must be one this command wrote; a run folder, or a folder inside one, is
    refused before training (``FileExistsError``, :func:`slugkit.common.outguard.check_model_out`).
    The test metrics in the report are measured on the model *as loaded back* through
    ``open_clip.create_model_and_transforms("local-dir:...")`` and ``open_clip.get_tokenizer``; loading also checks
    that open_clip's eval transform equals the training normalisation. Returns the report.
    """
    model_cfg(vision_layers)
    check_model_out(out_dir, overwrite, REPORT_NAME, CONFIG_NAME)  # before the training, so none is thrown away
    with _num_threads(threads), atomic_dir(out_dir, overwrite, marker=REPORT_NAME) as tmp:  # same threads in the eval
        return _train_embedded(tmp, steps, seed, threads, progress, per_class, eval_per_class, vision_layers)


def _train_embedded(out_dir: Path, steps, seed, threads, progress, per_class, eval_per_class,
                    vision_layers=None) -> dict:
    import open_clip

    t0 = time.perf_counter()
    model, _, info = train_model(steps=steps, seed=seed, threads=threads, per_class=per_class, progress=progress,
                                 vision_layers=vision_layers)

    config = {"model_cfg": model_cfg(vision_layers), "preprocess_cfg": PREPROCESS_CFG}
    atomic_write_bytes(out_dir / CONFIG_NAME, (json.dumps(config, indent=2) + "\n").encode("utf-8"))
    atomic_write_bytes(out_dir / WEIGHTS_NAME, _state_dict_bytes(model))
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        os.chmod(out_dir / name, 0o644)  # mkstemp creates 0600; these are package data

    # Load it back the way users will, and check it is the trained model with the training preprocessing.
    loaded, tokenizer, preprocess = load_world_model(out_dir)
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        if k != k2 or not torch.equal(a, b):
            raise RuntimeError(f"reloaded model differs from the trained one at {k}")
    probe = [s.image for s in world.make_samples("val", "identity", 2, classes=[0, 1])]
    probe += [jpeg_roundtrip(s.image) for s in world.make_samples("val", "utility", 2, classes=[0, 1])]
    check_preprocess(preprocess, probe)

    t_eval = time.perf_counter()
    metrics = evaluate_world_model(loaded, tokenizer, preprocess, per_class=eval_per_class)
    report = {
        "steps": steps,
        "seed": seed,
        "threads": threads,
        "train_images_per_class": per_class,
        "batch_size": len(world.IDENTITIES) + len(world.UTILITY_CLASSES),
        "recipe": {
            "optimizer": info.pop("optimizer"),
            "lr": LR,
            "betas": list(BETAS),
            "eps": 1e-6,
            "weight_decay": WEIGHT_DECAY,
            "weight_decay_on": "parameters with ndim >= 2",
            "warmup_steps": WARMUP_STEPS,
            "schedule": "linear warm-up then cosine to 0",
            "max_logit_scale": 100.0,
            "augmentation": "horizontal flip of the whole batch on odd steps",
            "images": "JPEG q95 4:4:4 round trip (slugkit.data.shards.encode_image)",
        },
        "seconds": round(time.perf_counter() - t0, 2),
        **info,
        "eval_seconds": round(time.perf_counter() - t_eval, 2),
        "test_metrics": metrics,
        "test_images_per_class": eval_per_class,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "versions": {
            "torch": torch.__version__,
            "open_clip": open_clip.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
    }
    atomic_write_bytes(out_dir / REPORT_NAME, (json.dumps(report, indent=2) + "\n").encode("utf-8"))
    os.chmod(out_dir / REPORT_NAME, 0o644)
    return report
