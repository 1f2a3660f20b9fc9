"""Shared fixtures for the numerical tests of the SLUG core (spec §10, "Numerical parity tests").

Everything is built on a tiny random-weight open_clip ``CLIP`` (``OpenClipAdapter.from_config``, spec §10 fixture:
embed 32, ViT 2x64 patch 8 on 32x32 images, text 2x32 with 4 heads) with the real BPE tokenizer, CPU, fp32, no
downloads.

* ``adapter``: the random model (seed 0). Built once per session; every test gets its own deep copy of the weights,
  so a test that edits a tensor can never leak into another one.
* ``trained_adapter``: the same architecture after ~1 s of CLIP training on the synthetic world below, so that the
  zero-shot metrics mean something (the target is recognised, edits along g_f make it forgotten); used where the
  search must actually accept / reject steps.
* Synthetic data: every class (12 identities + 6 utility classes) has a fixed random "prototype" image; a sample is
  ``0.7 * prototype + 0.3 * noise`` in [-1, 1]. Captions are tokenized with the real BPE tokenizer.
"""

from __future__ import annotations

import copy

import pytest
import torch

from slugkit.eval.zeroshot import EvalSuite, ImageSet

TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}
SEED = 0

# Twelve identity names, two identity templates; the forget target is NAMES[0].
NAMES = [
    "alice abbott", "bruno baker", "carla chen", "dmitri dolan", "erin evans", "felix ford",
    "greta gray", "hugo hill", "irene ito", "jonas jones", "karen kim", "lucas lopez",
]
IDENTITY_TEMPLATES = ["a photo of {}.", "{}."]
UTILITY_CLASSES = ["dog", "cat", "car", "tree", "boat", "chair"]
UTILITY_TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]
CLASSES = NAMES + UTILITY_CLASSES  # class index c < 12: identity c; c >= 12: utility class c - 12
TARGET = 0

# D_f: 5 pairs of the target (5 = 2+2+1 = 3+2: partial last batches for batch sizes 2 and 3).
FORGET_CAPTIONS = [
    "a photo of alice abbott at the beach.",
    "alice abbott on stage",
    "portrait of alice abbott smiling",
    "alice abbott and a dog in the park",
    "alice abbott.",
]
# D_r: 7 pairs of other classes (batches of 4 and 3: sample weighting matters).
RETAIN_CLASSES = [3, 5, 12, 13, 14, 15, 17]
RETAIN_CAPTIONS = [
    "dmitri dolan at work",
    "felix ford.",
    "a dog running on grass",
    "two cats sleeping on a sofa",
    "a red car parked on the street",
    "a tall tree in the snow",
    "a wooden chair by the window",
]


def make_images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    """``n`` uniform random images in [-1, 1] from a private generator (the global RNG is not touched)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def class_images(cls: int, n: int, seed: int) -> torch.Tensor:
    """``n`` images of class ``cls``: its fixed prototype plus per-sample noise, in [-1, 1]."""
    proto = make_images(1, seed=1000 + cls)
    return (0.7 * proto + 0.3 * make_images(n, seed=seed)).clamp(-1, 1)


def split_batches(images: torch.Tensor, tokens: torch.Tensor, batch_size: int):
    """Consecutive ``(images, tokens)`` batches; the last one is partial when ``batch_size`` does not divide N."""
    return [(images[i:i + batch_size], tokens[i:i + batch_size]) for i in range(0, len(images), batch_size)]


def _build_adapter():
    pytest.importorskip("open_clip")
    from slugkit.models.open_clip import OpenClipAdapter

    return OpenClipAdapter.from_config(TINY_CFG, seed=SEED)


def clone_adapter(a):
    """A new adapter with deep-copied weights (the tokenizer, which is stateless, is shared)."""
    from slugkit.models.open_clip import OpenClipAdapter

    return OpenClipAdapter(copy.deepcopy(a.model), a.tokenizer, a._preprocess, dict(a.model_id))


@pytest.fixture(scope="session")
def _base_adapter():
    return _build_adapter()


@pytest.fixture
def adapter(_base_adapter):
    """The tiny random open_clip adapter (seed 0), private to the test."""
    return clone_adapter(_base_adapter)


@pytest.fixture(scope="session")
def tokenizer(_base_adapter):
    return _base_adapter.tokenizer


def forget_pairs(tokenizer):
    """5 forget pairs: images of the target, captions naming it."""
    return class_images(TARGET, len(FORGET_CAPTIONS), seed=1), tokenizer(FORGET_CAPTIONS)


def retain_pairs(tokenizer):
    """7 retain pairs of other classes."""
    imgs = torch.cat([class_images(c, 1, seed=300 + c) for c in RETAIN_CLASSES])
    return imgs, tokenizer(RETAIN_CAPTIONS)


@pytest.fixture
def forget_data(tokenizer):
    return forget_pairs(tokenizer)


@pytest.fixture
def retain_data(tokenizer):
    return retain_pairs(tokenizer)


def _gradients(a):
    from slugkit.slug.gradients import compute_gradients

    return compute_gradients(a, split_batches(*forget_pairs(a.tokenizer), 2),
                             split_batches(*retain_pairs(a.tokenizer), 4), progress=False)


@pytest.fixture(scope="session")
def base_grads(_base_adapter):
    """``compute_gradients`` of every candidate of the random model (forget batches 2+2+1, retain 4+3). Read-only."""
    return _gradients(_base_adapter)


@pytest.fixture(scope="session")
def _trained_base(_base_adapter):
    """The random model after 30 Adam steps of CLIP loss on 4 images x 18 classes (deterministic, ~1-2 s).

    The 49408-row token embedding stays frozen (it dominates the optimizer cost and is not needed to separate 18
    prompts). After training every base metric of :func:`make_suite` is 1.0.
    """
    a = clone_adapter(_base_adapter)
    emb = a.model.token_embedding.weight
    emb.requires_grad_(False)
    train_on_world(a, [p for p in a.model.parameters() if p.requires_grad], lr=2e-3, steps=30, seed=7)
    emb.requires_grad_(True)
    return a


@pytest.fixture
def trained_adapter(_trained_base):
    return clone_adapter(_trained_base)


@pytest.fixture(scope="session")
def trained_grads(_trained_base):
    """``compute_gradients`` of every candidate of the trained model. Read-only."""
    return _gradients(_trained_base)


def make_suite() -> EvalSuite:
    """A tiny synthetic evaluation suite over the 12 names (target 0) and 6 utility classes.

    * forget: 4 images of the target (other noise than the gradient forget pairs);
    * related: identities 1..4 with 3, 2, 2, 1 images (unequal counts: the macro and micro averages can differ);
    * utility: 6 classes x 2 images, 2 templates.
    """
    rel_labels = torch.tensor([1, 1, 1, 2, 2, 3, 3, 4], dtype=torch.long)
    util_labels = torch.arange(len(UTILITY_CLASSES)).repeat_interleave(2)
    return EvalSuite(
        names=list(NAMES),
        identity_templates=list(IDENTITY_TEMPLATES),
        target=TARGET,
        forget=ImageSet(class_images(TARGET, 4, seed=11), torch.full((4,), TARGET, dtype=torch.long)),
        related=ImageSet(torch.cat([class_images(int(c), 1, seed=100 + k) for k, c in enumerate(rel_labels)]),
                         rel_labels),
        utility_classnames=list(UTILITY_CLASSES),
        utility_templates=list(UTILITY_TEMPLATES),
        utility=ImageSet(torch.cat([class_images(len(NAMES) + int(c), 1, seed=200 + k)
                                    for k, c in enumerate(util_labels)]), util_labels),
    )


@pytest.fixture
def suite() -> EvalSuite:
    return make_suite()


def train_on_world(a, params, lr: float, steps: int, seed: int):
    """A few Adam steps of CLIP loss on 4 images x 18 classes of the synthetic world (deterministic); any adapter."""
    imgs = torch.cat([class_images(c, 4, seed=50 + c) for c in range(len(CLASSES))])
    caps = [(IDENTITY_TEMPLATES if c < len(NAMES) else UTILITY_TEMPLATES)[j % 2].format(name)
            for c, name in enumerate(CLASSES) for j in range(4)]
    tokens = a.tokenize(caps)
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    a.model.train()
    for _ in range(steps):
        idx = torch.randperm(len(imgs), generator=g)[:24]
        loss = a.retain_loss(imgs[idx], tokens[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    a.model.eval()
    a.model.zero_grad(set_to_none=True)
    return a


def run_stages(stages, x, ctx, start=0, stop=None):
    """Compose ``stages[start:stop]`` of a staged tower forward."""
    for st in stages[start:stop]:
        x = st.fn(x, ctx)
    return x


@torch.no_grad()
def check_stage_index(adapter, images, tokens, scale):
    """Perturbing each candidate (noise of std ``scale(p)``) leaves the activations entering its stage unchanged and
    changes the tower output: what the cached search relies on. The weights are restored exactly."""
    params = dict(adapter.model.named_parameters())
    g = torch.Generator().manual_seed(0)
    for n in adapter.candidate_names():
        tower = adapter.tower_of(n)
        stages = adapter.stages(tower)
        x0, ctx = (images, None) if tower == "vision" else (tokens, tokens)
        k = adapter.stage_index(tower, n)
        before_in, before_out = run_stages(stages, x0, ctx, 0, k), run_stages(stages, x0, ctx)
        p = params[n]
        saved = p.detach().clone()
        p.add_(scale(saved) * torch.randn(p.shape, generator=g))
        try:
            assert torch.equal(run_stages(stages, x0, ctx, 0, k), before_in), n
            assert not torch.allclose(run_stages(stages, x0, ctx), before_out, atol=1e-6), n
        finally:
            p.copy_(saved)


def write_captioned_world(root):
    """Captioned forget/retain folders and disjoint val/test identity class folders (PNG), from conftest's world."""
    import random

    from hf_tiny import to_pil

    def save(img, path, caption=None):
        path.parent.mkdir(parents=True, exist_ok=True)
        to_pil(img).save(path)
        if caption is not None:
            path.with_suffix(".txt").write_text(caption)

    for k, (img, cap) in enumerate(zip(class_images(0, 5, seed=1), FORGET_CAPTIONS)):
        save(img, root / "forget" / f"{k}.png", cap)
    rng = random.Random(0)
    for k, (c, cap) in enumerate(zip(RETAIN_CLASSES * 3, RETAIN_CAPTIONS * 3)):
        save(class_images(c, 1, seed=300 + k)[0], root / "retain" / f"{k}.png", cap)
    for split, seed in (("val", 11), ("test", 21)):
        for c, name in enumerate(NAMES[:6]):
            for j, img in enumerate(class_images(c, 3, seed=seed + 31 * c + rng.randrange(1000))):
                save(img, root / split / name.replace(" ", "_") / f"{j}.png")
    (root / "names.txt").write_text("\n".join(NAMES) + "\n")


def raw_tar(path, members) -> str:
    """A tar file of ``(member name, bytes)`` exactly as given (no pairing or checks): for hostile shard inputs."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return str(path)


# ----------------------------------------------------------------------- a CLIP text-encoder patch (LoRA export)
TEXT_PATCH_TENSORS = [f"text_model.encoder.layers.2.self_attn.{x}_proj.weight" for x in "qkv"] + \
    [f"text_model.encoder.layers.3.mlp.fc{i}.weight" for i in (1, 2)]


def spectral_edit(model, names, seed: int = 0, decays=(0.5, 0.6, 0.7), size: float = 0.05) -> dict:
    """New values ``W + ΔW`` for the tensors ``names`` of ``model``: ``ΔW = U·diag(σ)·Vᵀ`` with random orthonormal
    ``U``, ``V`` (QR of seeded Gaussians) and ``σ_j = size·‖W‖_F·d^j``, ``d`` cycling over ``decays`` — the decaying
    spectrum of a gradient step (a SLUG edit), without a gradient pass. Deterministic for the same arguments."""
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, name in enumerate(names):
        w = params[name].detach()
        n_out, n_in = w.shape
        k = min(n_out, n_in)
        u = torch.linalg.qr(torch.randn(n_out, k, generator=g, dtype=torch.float64))[0]
        v = torch.linalg.qr(torch.randn(n_in, k, generator=g, dtype=torch.float64))[0]
        sigma = size * float(w.norm()) * decays[i % len(decays)] ** torch.arange(k, dtype=torch.float64)
        out[name] = (w.double() + (u * sigma) @ v.T).to(w.dtype)
    return out


@pytest.fixture(scope="session")
def hf_text_patch():
    """``(adapter, patch)``: the tiny transformers CLIP of ``hf_tiny`` and a patch of its text layer 2's q/k/v and
    layer 3's fc1/fc2 (:func:`spectral_edit`), shaped like what `slug unlearn --family hf_clip --consumer sd:DIR`
    writes (architecture facts included). Tests must not modify either."""
    from hf_tiny import build_adapter

    from slugkit.patch import architecture_facts, make_patch

    a = build_adapter(seed=0)
    new = spectral_edit(a.model, TEXT_PATCH_TENSORS)
    return a, make_patch(a.model, new, base_model=a.model_id, adapter=a.family, concept="alice abbott",
                         architecture=architecture_facts(a.model))
