"""Shared fixtures for the numerical tests of the SLUG core (spec §10, "Numerical parity tests").

Everything is built on a tiny random-weight open_clip ``CLIP`` (``OpenClipAdapter.from_config``) with the real BPE
tokenizer, CPU, fp32; no downloads. Sizes are chosen so the whole numerical suite runs in seconds on 2 cores.

Fixtures that hand out an adapter are *function*-scoped (a fresh model is cheap: ~0.1 s) so that a test that edits
weights can never leak into another one; the data fixtures are plain tensors built from fixed generators.
"""

from __future__ import annotations

import pytest
import torch

from slugkit.eval.zeroshot import EvalSuite, ImageSet

# The spec §10 fixture, with a 16-token context (captions here are short) and the full BPE vocabulary.
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}
SEED = 0

# Twelve identity names (two BPE words each), two identity templates; the target is names[0].
NAMES = [
    "alice abbott", "bruno baker", "carla chen", "dmitri dolan", "erin evans", "felix ford",
    "greta gray", "hugo hill", "irene ito", "jonas jones", "karen kim", "lucas lopez",
]
IDENTITY_TEMPLATES = ["a photo of {}.", "{}."]
UTILITY_CLASSES = ["dog", "cat", "car", "tree", "boat", "chair"]
UTILITY_TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]
TARGET = 0

FORGET_CAPTIONS = [
    "a photo of alice abbott at the beach.",
    "alice abbott on stage",
    "portrait of alice abbott smiling",
    "alice abbott and a dog in the park",
    "alice abbott.",
]
RETAIN_CAPTIONS = [
    "a red car parked on the street",
    "two cats sleeping on a sofa",
    "a boat on a calm lake",
    "a tall tree in the snow",
    "a wooden chair by the window",
    "a dog running on grass",
    "a bowl of fruit on a table",
]


def make_images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    """``n`` random images in [-1, 1] from a fixed generator (no global RNG state is touched)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def split_batches(images: torch.Tensor, tokens: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive batches, the last one partial when ``batch_size`` does not divide the sample count."""
    return [(images[i:i + batch_size], tokens[i:i + batch_size]) for i in range(0, len(images), batch_size)]


def new_adapter():
    """The tiny random adapter (skips the calling test when open_clip, the ``clip`` extra, is not installed)."""
    pytest.importorskip("open_clip")
    from slugkit.models.open_clip import OpenClipAdapter

    return OpenClipAdapter.from_config(TINY_CFG, seed=SEED)


@pytest.fixture
def adapter():
    """A fresh tiny random open_clip adapter (same weights every time: seed 0)."""
    return new_adapter()


@pytest.fixture
def forget_data(adapter):
    """5 forget pairs (images in [-1, 1], BPE-tokenized captions naming the target)."""
    return make_images(len(FORGET_CAPTIONS), seed=1), adapter.tokenize(FORGET_CAPTIONS)


@pytest.fixture
def retain_data(adapter):
    """7 retain pairs: batches of 4 and 3 (a partial last batch, so sample weighting matters)."""
    return make_images(len(RETAIN_CAPTIONS), seed=2), adapter.tokenize(RETAIN_CAPTIONS)


def make_suite(seed: int = 3) -> EvalSuite:
    """A tiny synthetic evaluation suite.

    * forget: the 5 forget-pair images (the target's "validation images");
    * related: identities 1..4 with 3, 2, 2, 1 images (unequal counts: macro != micro average in general);
    * utility: 6 classes x 2 images, 2 templates.
    """
    forget_imgs = make_images(len(FORGET_CAPTIONS), seed=1)
    rel_labels = torch.tensor([1, 1, 1, 2, 2, 3, 3, 4], dtype=torch.long)
    util_labels = torch.arange(len(UTILITY_CLASSES)).repeat_interleave(2)
    return EvalSuite(
        names=list(NAMES),
        identity_templates=list(IDENTITY_TEMPLATES),
        target=TARGET,
        forget=ImageSet(forget_imgs, torch.full((len(forget_imgs),), TARGET, dtype=torch.long)),
        related=ImageSet(make_images(len(rel_labels), seed=seed), rel_labels),
        utility_classnames=list(UTILITY_CLASSES),
        utility_templates=list(UTILITY_TEMPLATES),
        utility=ImageSet(make_images(len(util_labels), seed=seed + 1), util_labels),
    )


@pytest.fixture
def suite() -> EvalSuite:
    return make_suite()
