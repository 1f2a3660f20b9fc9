"""The embedded CLIP's held-out check after training (``train_report.json``): zero-shot top-1 over the 60 identities and
the 30 utility classes on freshly drawn test-split images, as open_clip's ``build_zero_shot_classifier`` does it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from . import render as world
from .render import jpeg_roundtrip


@torch.no_grad()
def zero_shot_classifier(model, tokenizer, classnames: list[str], templates: list[str]) -> torch.Tensor:
    """``[embed_dim, n_classes]``: per class, the mean of the normalised prompt embeddings, renormalised."""
    weights = []
    for name in classnames:
        tokens = tokenizer([t.format(name) for t in templates])
        emb = F.normalize(model.encode_text(tokens), dim=-1).mean(dim=0)
        weights.append(F.normalize(emb, dim=-1))
    return torch.stack(weights, dim=1)


@torch.no_grad()
def _image_features(model, preprocess, images: list[Image.Image], batch_size: int = 500) -> torch.Tensor:
    feats = []
    for lo in range(0, len(images), batch_size):
        batch = torch.stack([preprocess(im) for im in images[lo : lo + batch_size]])
        feats.append(F.normalize(model.encode_image(batch), dim=-1))
    return torch.cat(feats)


@torch.no_grad()
def evaluate_world_model(model, tokenizer, preprocess, per_class: int = 50, jpeg: bool = True) -> dict:
    """Zero-shot accuracy on the held-out split "test" (50 images per class by default).

    * identity: 60-way over all identity names (prompts :data:`world.IDENTITY_EVAL_TEMPLATES`), top-1 and top-5,
      plus the worst identity's top-1;
    * utility: 30-way over the colour x shape classes (prompts :data:`world.UTILITY_EVAL_TEMPLATES`), top-1.

    ``jpeg=True`` evaluates the images as written to shards / image folders (JPEG round trip). Returns fractions.
    """
    was_training = model.training
    model.eval()
    out: dict = {}
    for kind, names, templates in (
        ("identity", world.identity_names(), world.IDENTITY_EVAL_TEMPLATES),
        ("utility", [c.name for c in world.UTILITY_CLASSES], world.UTILITY_EVAL_TEMPLATES),
    ):
        samples = world.make_samples("test", kind, per_class)
        images = [jpeg_roundtrip(s.image) if jpeg else s.image for s in samples]
        labels = torch.tensor([s.label for s in samples])
        logits = _image_features(model, preprocess, images) @ zero_shot_classifier(model, tokenizer, names, templates)
        top5 = logits.topk(min(5, len(names)), dim=1).indices
        correct1 = top5[:, 0] == labels
        out[f"{kind}_top1"] = correct1.float().mean().item()
        if kind == "identity":
            out["identity_top5"] = (top5 == labels[:, None]).any(dim=1).float().mean().item()
            per_id = torch.zeros(len(names)).index_add_(0, labels, correct1.float()) / per_class
            out["identity_top1_worst"] = per_id.min().item()
        out[f"n_{kind}_images"] = len(samples)
    model.train(was_training)
    return out
